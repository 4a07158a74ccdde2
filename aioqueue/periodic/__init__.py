"""Periodic tasks: cron and interval schedules, each tick sent once by any number of schedulers."""

from .entries import Entry
from .scheduler import Scheduler, Tick, tick_id
from .schedules import Cron, Every, crontab

__all__ = ["Cron", "Entry", "Every", "Scheduler", "Tick", "crontab", "tick_id"]

"""The worker side: run loop, slots, executors, process-pool children."""

from .core import Worker

__all__ = ["Worker"]

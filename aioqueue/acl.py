"""Least privilege: what a broker account needs for aioqueue, and nothing more.

Every Redis key and channel aioqueue uses starts with ``<key_prefix>:`` and every RabbitMQ queue
and exchange with ``<key_prefix>.``, so one account per deployment can be limited to them:

* **Redis** (6+): :func:`redis_acl` gives the ``ACL SETUSER`` line: the app's keys
  (``~<prefix>:*``) and channels (``&<prefix>:*``), and only the commands in
  :data:`REDIS_COMMANDS` (Lua scripts run with the same rights). ``CONFIG GET`` is left out on
  purpose: the start-up check of ``maxmemory-policy`` then says nothing instead of failing.
* **RabbitMQ**: :func:`rabbitmq_permissions` gives the configure, write and read regexes for
  ``rabbitmqctl set_permissions`` on a vhost of the app's own. ``amq.default`` is the name the
  default exchange has in permission checks; publishing to a queue goes through it.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["REDIS_COMMANDS", "rabbitmq_permissions", "redis_acl"]

REDIS_COMMANDS: Final = (
    # strings and keys: results, states, claims, heartbeats
    "get",
    "set",
    "mget",
    "del",
    "exists",
    "pexpire",
    "expire",
    "time",
    # lists: queues, processing lists, dead letters
    "lpush",
    "rpush",
    "lpop",
    "rpop",
    "lrange",
    "lrem",
    "llen",
    "lpos",
    "lindex",
    "blmove",
    "blpop",
    # sorted sets and sets: delays, revocations, the priority notice
    "zadd",
    "zrem",
    "zcard",
    "zrange",
    "zrangebyscore",
    "zremrangebyscore",
    "zscore",
    "sadd",
    "srem",
    "smembers",
    "scard",
    # hashes: periodic-task claims, kept run-time limits
    "hset",
    "hget",
    "hgetall",
    "hdel",
    # streams: task events
    "xadd",
    "xread",
    "xrevrange",
    # pub/sub: result pushes, state watches, the control channel
    "publish",
    "subscribe",
    "unsubscribe",
    "pubsub|channels",
    # scripts and transactions
    "eval",
    "evalsha",
    "script|load",
    "multi",
    "exec",
    # connection
    "ping",
    "select",
    "hello",
    "client|setname",
)
"""Every Redis command aioqueue sends (its Lua scripts included)."""


def redis_acl(user: str, key_prefix: str, password: str = "<password>") -> str:
    """The ``ACL SETUSER`` line for an account limited to one app's keys, channels, commands."""
    commands = " ".join(f"+{name}" for name in REDIS_COMMANDS)
    return (
        f"ACL SETUSER {user} on >{password} resetkeys ~{key_prefix}:* "
        f"resetchannels &{key_prefix}:* -@all {commands}"
    )


def rabbitmq_permissions(key_prefix: str) -> tuple[str, str, str]:
    """(configure, write, read) regexes for ``rabbitmqctl set_permissions -p <vhost> <user>``."""
    own = f"^{re.escape(key_prefix)}\\..*"
    return own, f"{own}|^amq\\.default$", own

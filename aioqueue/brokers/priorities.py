"""Message priorities on the Redis and memory brokers: the order in which a queue is taken.

A message's priority (0..9, higher is more urgent, RabbitMQ's convention) travels in its
envelope as the first key, so a broker reads it from the body's first bytes
(:func:`aioqueue.message.priority_of`). Each queue keeps one FIFO list per priority: level 0
(messages sent without a priority, or with 0) is the queue's ordinary list, so a queue that
never sees a priority works exactly as before; levels 1..9 get a list each on first use.

The policy, per consumer and per queue:

* A consumer takes from the highest non-empty level first, oldest first within a level.
* Anti-starvation: every :data:`LOW_TURN`-th message it takes from a queue while that queue
  holds prioritised messages is taken from the *lowest* non-empty level instead. So while
  higher levels keep arriving, the lowest waiting level still gets one message in ten of each
  consumer's takes: it is slowed, never starved. (Middle levels are not given a share: when
  both a higher and a lower level are busy, a middle one waits for the higher to drain.)
* A message given back (shutdown, a lost lease), and a delayed one when it falls due, goes to
  the front of its own level.

RabbitMQ orders by priority itself and has no such share: there a higher priority always goes
first (see the README).
"""

from __future__ import annotations

from typing import Final

__all__ = ["LEVEL_KEY", "LOW_TURN", "LUA_DESTINATION"]

LOW_TURN: Final = 10
"""One take in this many goes to the lowest non-empty level (see the module docstring)."""

LEVEL_KEY: Final = ":priority:"
"""Redis: the list of priority N of queue key ``p:{q}`` is ``p:{q}:priority:N``."""

# Lua: where a body goes back to in queue key `queue` (p:{q}): its priority's list (whose marker
# key it sets: the caller pushes within the same script), or the queue itself for priority 0 /
# none. The priority is the envelope's first key, possibly behind an
# '{"attempt":N,' stamp. Also returns true for a priority list, whose consumers must be woken
# by a notice (a BLMOVE waits on the queue's own list only).
LUA_DESTINATION: Final = """
local function destination(at, v)
  local n = string.match(v, '^{"priority":(%d)[,}]')
  if not n and string.sub(v, 1, 11) == '{"attempt":' then
    n = string.match(v, '^{"attempt":%d+,"priority":(%d)[,}]')
  end
  if n and n ~= '0' then
    redis.call('SADD', KEYS[at + 1], '1')
    return KEYS[at + 1 + tonumber(n)], true
  end
  return KEYS[at], false
end
"""
"""Lua ``destination(at, v)``: the list a message ``v`` goes back to, and whether it is urgent.

Every key it may touch is declared (Redis Cluster needs that): from ``KEYS[at]`` on, a script
using it gets the queue's *route*, 11 keys: the queue's list, its priority marker, and its
priority lists 1..9 (``_Keys.route`` in ``redis.py``).
"""

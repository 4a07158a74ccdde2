"""A workflow step's whole settle in one Redis script, when broker and results share a server.

One script, fenced on the message still being in the worker's processing list, does in order:
store the step's outcome (first wins); only if that store won, store the same outcome under
the chain steps that will not run, push the messages it causes (next step, links, errbacks),
count it in its chord (SADD of its id: a member run again is counted once) and, when that
count completes and the chord's ``sent`` marker is newly set, push the chord's callback; then
remove the message from the processing list. A worker killed at any point leaves either none
of this (the message comes back and runs again) or all of it (the message is gone), so a step
is never lost nor sent twice, and a chord's callback is sent exactly once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._redis import Script
from ..brokers._redis_delays import URGENT
from ..message import priority_of

if TYPE_CHECKING:
    from ..backends.redis import RedisBackend
    from ..brokers.base import Outgoing
    from ..brokers.redis import RedisBroker, _RedisDelivery

__all__ = ["settle_in_one_script"]

# KEYS: 1 processing list, 2..1+s result keys, 2+s chord set, 3+s chord's sent marker, then
# per message pushed: its list (or delayed set) and its queue's priority marker.
# ARGV: 1 body, 2 outcome, 3 px, 4 s, 5 '1' when a chord member, 6 member id, 7 chord size,
# 8 messages pushed always, 9 messages pushed when the chord completes, then per result key
# (reply channel or '', push head, done channel), then per message (kind, score, body, wake).
_SETTLE_FLOW = Script(
    """
if not redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1) then return 0 end
local outcome, px, s = ARGV[2], ARGV[3], tonumber(ARGV[4])
local function store(i)
  if redis.call('SET', KEYS[1 + i], outcome, 'PX', px, 'NX') then
    local reply = ARGV[7 + 3 * i]
    if reply ~= '' then redis.call('PUBLISH', reply, ARGV[8 + 3 * i] .. outcome) end
    redis.call('PUBLISH', ARGV[9 + 3 * i], '')
    return true
  end
  return false
end
if store(1) then
  for i = 2, s do store(i) end
  local ka, kk = 10 + 3 * s, 4 + s
  local function push()
    local kind, score, body, wake = ARGV[ka], ARGV[ka + 1], ARGV[ka + 2], ARGV[ka + 3]
    if kind == 'Z' then
      redis.call('ZADD', KEYS[kk], score, body)
      redis.call('PUBLISH', wake, score)
    else
      redis.call('LPUSH', KEYS[kk], body)
      if kind == 'P' then
        redis.call('SADD', KEYS[kk + 1], '1')
        redis.call('PUBLISH', wake, 'URGENT')
      end
    end
    ka, kk = ka + 4, kk + 2
  end
  for _ = 1, tonumber(ARGV[8]) do push() end
  if ARGV[5] == '1' then
    local set = KEYS[2 + s]
    redis.call('SADD', set, ARGV[6])
    redis.call('PEXPIRE', set, px)
    if redis.call('SCARD', set) >= tonumber(ARGV[7])
        and redis.call('SET', KEYS[3 + s], '1', 'PX', px, 'NX') then
      for _ = 1, tonumber(ARGV[9]) do push() end
    end
  end
end
redis.call('LREM', KEYS[1], -1, ARGV[1])
return 1
""".replace("'URGENT'", "'" + URGENT.decode() + "'")
)


def _push_arguments(
    broker: RedisBroker, items: list[Outgoing], keys: list[Any], args: list[Any]
) -> None:
    """Where each message goes, the way ``RedisBroker.publish_many`` sends it."""
    now = time.time()
    for queue, body, eta in items:
        queue_keys = broker.keys(queue)
        if eta is not None and eta > now:
            keys += [queue_keys.delayed, queue_keys.marker]
            args += ["Z", repr(eta), body, queue_keys.wake]
        elif level := priority_of(body):
            keys += [queue_keys.levels[level], queue_keys.marker]
            args += ["P", "0", body, queue_keys.wake]
        else:
            keys += [queue_keys.queue, queue_keys.marker]
            args += ["L", "0", body, queue_keys.wake]


async def settle_in_one_script(
    backend: RedisBackend,
    broker: RedisBroker,
    delivery: _RedisDelivery,
    *,
    stores: list[str],
    outcome: bytes,
    ttl: float,
    reply_to: str | None,
    follow: list[Outgoing],
    chord: tuple[str, str, int] | None,
    callback: list[Outgoing],
) -> bool:
    """Run the script (see the module docstring). ``stores``: the step's own id first, then
    the ids of the steps that will not run; ``chord``: (chord id, member id, size) when the
    step ends a chord member. Returns whether the worker still held the message."""
    keys: list[Any] = [delivery.processing]
    args: list[Any] = [delivery.body, outcome, backend.px(ttl), len(stores)]
    if chord is not None:
        args += ["1", chord[1], chord[2]]
    else:
        args += ["0", "", 0]
    args += [len(follow), len(callback) if chord is not None else 0]
    for task_id in stores:
        keys.append(backend.result_key(task_id))
        args += backend.store_arguments(task_id, ttl, reply_to)
    if chord is not None:
        keys += backend.chord_keys(chord[0])
    else:
        keys += [delivery.processing, delivery.processing]  # unused
    _push_arguments(broker, follow, keys, args)
    if chord is not None:
        _push_arguments(broker, callback, keys, args)
    held = await _SETTLE_FLOW.run(backend.batcher, keys, args)
    delivery.settled()
    return bool(held)

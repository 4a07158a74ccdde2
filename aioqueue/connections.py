"""Brokers and result backends chosen by URL scheme, imported only when used.

A process that only talks to Redis never imports aio-pika, and the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Config, mask_url
from .errors import ConfigurationError
from .tls import with_tls

if TYPE_CHECKING:
    from .backends.base import ResultBackend
    from .brokers.base import Broker

__all__ = ["build_backend", "build_broker"]

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+cluster", "rediss+cluster"})
AMQP_SCHEMES = frozenset({"amqp", "amqps"})


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigurationError(f"not a URL: {mask_url(url)!r}")
    return scheme.lower()


def build_broker(url: str, conf: Config, app_name: str) -> Broker:
    scheme = _scheme(url)
    url = with_tls(url, conf)
    if scheme == "memory":
        from .brokers.memory import MemoryBroker

        return MemoryBroker(url)
    if scheme in REDIS_SCHEMES:
        from .brokers.redis import RedisBroker

        return RedisBroker(
            url,
            key_prefix=conf.key_prefix,
            connect_timeout=conf.broker_connect_timeout,
            heartbeat_interval=conf.worker_heartbeat_interval,
            heartbeat_ttl=conf.worker_heartbeat_ttl,
            client_name=f"aioqueue:{app_name}",
        )
    if scheme in AMQP_SCHEMES:
        from .brokers.amqp import AmqpBroker

        return AmqpBroker(
            url,
            key_prefix=conf.key_prefix,
            queue_type=conf.amqp_queue_type,
            delivery_limit=conf.amqp_delivery_limit if conf.amqp_delivery_limit > 0 else None,
            connect_timeout=conf.broker_connect_timeout,
            publish_timeout=conf.broker_publish_timeout,
            heartbeat=conf.amqp_heartbeat,
            reconnect_interval=conf.amqp_reconnect_interval,
            publisher_confirms=conf.amqp_publisher_confirms,
            channel_pool_size=conf.amqp_channel_pool_size,
            client_name=f"aioqueue:{app_name}",
            delete_queues_on_close=conf.amqp_delete_queues_on_close,
            priorities=conf.amqp_priorities,
        )
    raise ConfigurationError(
        f"unsupported broker URL scheme {scheme!r} in {mask_url(url)!r} "
        "(use memory://, redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, "
        "amqp:// or amqps://)"
    )


def build_backend(url: str, conf: Config, app_name: str) -> ResultBackend:
    scheme = _scheme(url)
    url = with_tls(url, conf)
    if scheme == "memory":
        from .backends.memory import MemoryBackend

        return MemoryBackend(url)
    if scheme in REDIS_SCHEMES:
        from .backends.redis import RedisBackend

        return RedisBackend(
            url,
            key_prefix=conf.key_prefix,
            connect_timeout=conf.broker_connect_timeout,
            client_name=f"aioqueue:{app_name}",
        )
    if scheme == "rpc":
        from .backends.rpc import RpcBackend

        broker_url = conf.broker_url
        if _scheme(broker_url) not in AMQP_SCHEMES:
            raise ConfigurationError(
                f"rpc:// results travel over the AMQP broker; broker_url is "
                f"{mask_url(broker_url)!r}"
            )
        return RpcBackend(
            with_tls(broker_url, conf),
            key_prefix=conf.key_prefix,
            connect_timeout=conf.broker_connect_timeout,
            publish_timeout=conf.broker_publish_timeout,
            heartbeat=conf.amqp_heartbeat,
            reconnect_interval=conf.amqp_reconnect_interval,
            publisher_confirms=conf.amqp_publisher_confirms,
            client_name=f"aioqueue:{app_name}",
        )
    raise ConfigurationError(
        f"unsupported result backend URL scheme {scheme!r} in {mask_url(url)!r} "
        "(use memory://, redis://, rediss://, unix://, redis+cluster://, rediss+cluster:// "
        "or rpc://)"
    )

"""App configuration: defaults, keyword arguments, config objects and ``AIOQUEUE_*`` variables.

Precedence, lowest first: built-in defaults, then keyword arguments and ``config_from_object``
in the order they are applied, then environment variables. Environment wins so an operator can
point the same code at another broker (``AIOQUEUE_BROKER_URL=amqp://... aioqueue worker``)
without editing it.

Secrets never leave this module in clear: ``humanize()``, ``table()`` and ``repr`` mask URL
passwords and every setting whose name says it is a key, token, password or signature.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from .errors import ConfigurationError

__all__ = ["Config", "mask_secrets", "mask_url"]

ENV_PREFIX = "AIOQUEUE_"
_SECRET_NAME = re.compile(r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE", re.IGNORECASE)
# URL query parameters that carry secrets (redis-py takes ?password=), but not file names.
_SECRET_PARAM = re.compile(r"PASS|TOKEN|SECRET|KEY|SIGNATURE|CREDENTIAL", re.IGNORECASE)
_NOT_SECRET_PARAM = re.compile(r"(FILE|PATH|DIR)$", re.IGNORECASE)
# Settings whose names look secret but are not (the prefix of Redis keys is not a key).
_NOT_SECRET = frozenset({"key_prefix"})
# Environment names that differ from the setting name, as Celery users know them.
_ENV_ALIASES = {"broker_url": "BROKER_URL", "result_backend": "RESULT_BACKEND"}
MASK = "********"


@dataclass(slots=True)
class Config:
    """Every setting an App understands, with its default."""

    broker_url: str = "memory://"
    result_backend: str | None = None
    key_prefix: str = "aioqueue"
    default_queue: str = "default"
    result_ttl: float = 86400.0
    serializer: str = "json"
    accept_content: tuple[str, ...] = ("json",)
    max_message_size: int = 16 * 1024 * 1024
    track_started: bool = False
    max_attempts: int = 5
    acks_late: bool = True
    worker_concurrency: int = 100
    worker_threads: int = 40
    worker_processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    worker_max_tasks_per_child: int | None = None
    worker_shutdown_timeout: float = 30.0
    worker_heartbeat_interval: float = 2.0
    worker_heartbeat_ttl: float = 10.0
    broker_connect_timeout: float = 5.0
    broker_publish_timeout: float = 30.0
    # AMQP (amqp://, amqps://) and the rpc:// result backend; see brokers/amqp.py.
    amqp_queue_type: str = "classic"
    amqp_delivery_limit: int = 20
    amqp_heartbeat: float = 60.0
    amqp_reconnect_interval: float = 1.0
    amqp_publisher_confirms: bool = True
    amqp_channel_pool_size: int = 4
    amqp_delete_queues_on_close: bool = False
    _explicit: dict[str, Any] = field(default_factory=dict, repr=False)

    def update(self, values: Mapping[str, Any]) -> None:
        """Apply settings by name; an unknown name is an error, never silently ignored.

        All or nothing: when the result is invalid, the settings stay as they were.
        """
        names = self.names()
        for name in values:
            if name not in names:
                raise ConfigurationError(f"unknown setting {name!r}; known: {', '.join(names)}")
        previous = dict(self._explicit)
        self._explicit.update(values)
        try:
            self._resolve()
        except ConfigurationError:
            self._explicit = previous
            self._resolve()
            raise

    def from_object(self, obj: object | str) -> None:
        """Take known settings (any case) from a module, class, instance, mapping or import path."""
        if isinstance(obj, str):
            try:
                obj = importlib.import_module(obj)
            except ImportError as exc:
                raise ConfigurationError(f"cannot import config module {obj!r}: {exc}") from exc
        if isinstance(obj, Mapping):
            self.update({str(k).lower(): v for k, v in obj.items()})
            return
        found = {}
        for name in self.names():
            for spelling in (name, name.upper()):
                if hasattr(obj, spelling):
                    found[name] = getattr(obj, spelling)
        self.update(found)

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(Config) if not f.name.startswith("_"))

    def _resolve(self) -> None:
        for f in fields(Config):
            if f.name.startswith("_"):
                continue
            factory: Any = f.default_factory
            default = f.default if f.default is not dataclasses.MISSING else factory()
            value = self._explicit.get(f.name, default)
            env_name = ENV_PREFIX + _ENV_ALIASES.get(f.name, f.name.upper())
            raw = os.environ.get(env_name)
            if raw is not None:
                value = _coerce(f.name, raw, default)
            setattr(self, f.name, _normalise(f.name, value))
        self._check()

    def _check(self) -> None:
        """Reject combinations that cannot work (single values are checked where used)."""
        interval, ttl = self.worker_heartbeat_interval, self.worker_heartbeat_ttl
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (interval, ttl)
        )
        if not numbers or not 0 < interval < ttl:
            raise ConfigurationError(
                f"worker_heartbeat_ttl ({ttl!r}) must exceed worker_heartbeat_interval "
                f"({interval!r}), a positive number of seconds: a heartbeat that expires "
                "before it is renewed makes live workers look dead, and their tasks run twice"
            )
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(
                f"max_attempts must be a whole number of at least 1, not {attempts!r}"
            )
        timeout = self.broker_publish_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError(
                f"broker_publish_timeout must be a positive number of seconds, not {timeout!r}"
            )

    def __post_init__(self) -> None:
        self._resolve()

    def items(self) -> Iterator[tuple[str, Any]]:
        for name in self.names():
            yield name, getattr(self, name)

    def humanize(self) -> str:
        """``name: value`` lines with secrets masked, for logs and ``aioqueue inspect conf``."""
        return "\n".join(f"{name}: {value!r}" for name, value in mask_secrets(dict(self.items())))

    def table(self) -> dict[str, Any]:
        """The settings as a dict, secrets masked."""
        return dict(mask_secrets(dict(self.items())))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in mask_secrets(dict(self.items())))
        return f"Config({shown})"


def _coerce(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigurationError(f"environment setting for {name!r} is invalid: {exc}") from exc
    if name == "worker_max_tasks_per_child":
        return int(raw) if raw else None
    return raw


def _normalise(name: str, value: Any) -> Any:
    if name == "accept_content" and isinstance(value, str):
        return (value,)
    if name == "accept_content":
        return tuple(value)
    return value


def mask_url(url: str) -> str:
    """The URL with any password replaced, for errors, logs and reprs.

    Both places a password can travel are masked: the userinfo (``redis://:pw@host``) and the
    query (``redis://host/0?password=pw``, and any parameter named like a secret).
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            netloc = f"{user}:{MASK}@{host}"
    except ValueError:
        return MASK
    query = _mask_query(parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_query(query: str) -> str:
    if not query:
        return query
    pieces = []
    for piece in query.split("&"):
        name, sep, value = piece.partition("=")
        key = unquote_plus(name)
        if sep and value and _SECRET_PARAM.search(key) and not _NOT_SECRET_PARAM.search(key):
            piece = f"{name}={MASK}"
        pieces.append(piece)
    return "&".join(pieces)


def mask_secrets(values: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield (name, value) pairs with secret-looking settings and URL passwords masked."""
    for name, value in values.items():
        if name not in _NOT_SECRET and _SECRET_NAME.search(name) and value:
            yield name, MASK
        elif isinstance(value, str) and "://" in value:
            yield name, mask_url(value)
        else:
            yield name, value

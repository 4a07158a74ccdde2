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
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .input_limits import Limits

__all__ = ["Config", "mask_secrets", "mask_url"]

ENV_PREFIX = "AIOQUEUE_"
_SECRET_NAME = re.compile(r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE", re.IGNORECASE)
# URL query parameters that carry secrets (redis-py takes ?password=), but not file names.
_SECRET_PARAM = re.compile(r"PASS|TOKEN|SECRET|KEY|SIGNATURE|CREDENTIAL", re.IGNORECASE)
_NOT_SECRET_PARAM = re.compile(r"(FILE|PATH|DIR)$", re.IGNORECASE)
# Settings whose names look secret but are not (the prefix of Redis keys is not a key).
_NOT_SECRET = frozenset({"key_prefix", "ssl_keyfile"})
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
    task_routes: Any = None
    """Where tasks' messages go: see aioqueue.routing (a mapping, callable, or list of them)."""
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
    # Periodic tasks; see aioqueue/periodic/.
    beat_schedule: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    amqp_priorities: bool = False
    """True: classic work queues get x-max-priority=9 and message priorities are honoured. Off
    by default: it cost a worker's drain about 30% in our benchmark, and an existing queue
    cannot gain the argument (see the README); while off, a prioritised send is refused."""
    # How long a revocation is kept for workers that start later (seven days): longer than
    # the longest countdown you revoke.
    revoke_ttl: float = 7 * 86400.0
    concurrency_lease_ttl: float = 30.0
    """Seconds a concurrency permit outlives a worker that stopped renewing it (died)."""
    # Prometheus metrics of a worker (see aioqueue.metrics): off unless a port is set; the
    # queue depths are sampled every worker_metrics_interval seconds.
    worker_metrics_port: int | None = None
    worker_metrics_addr: str = "0.0.0.0"
    worker_metrics_interval: float = 15.0
    # Security; see aioqueue/signing.py and aioqueue/input_limits.py (the table of limits).
    signing_key: Any = None
    """HMAC key (str or bytes), or a list of them (the first signs, all verify): every body
    that crosses a broker is signed, and a worker refuses an unsigned or tampered one."""
    max_nesting_depth: int = 32
    max_task_name_length: int = 200
    max_headers: int = 64
    max_headers_size: int = 16 * 1024
    # TLS for rediss:// and amqps:// (see aioqueue/tls.py); the URL's query may set the files too.
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_verify: bool = True
    """False turns certificate and host name checks off (logged as a warning): never in
    production. The only way to do so; a URL asking for it is refused."""
    # Task events and worker heartbeats (see aioqueue/events.py): off, and then free.
    events: bool = False
    events_maxlen: int = 10_000
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
        if self.task_routes is not None:
            from .routing import check_routes  # here: routing needs the task module

            check_routes(self.task_routes)
        timeout = self.broker_publish_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError(
                f"broker_publish_timeout must be a positive number of seconds, not {timeout!r}"
            )

        self._check_security()
        revoke_ttl = self.revoke_ttl
        if isinstance(revoke_ttl, bool) or not isinstance(revoke_ttl, int | float):
            revoke_ttl = -1
        if not revoke_ttl > 0:
            raise ConfigurationError(
                f"revoke_ttl must be a positive number of seconds, not {self.revoke_ttl!r}"
            )

        lease = self.concurrency_lease_ttl
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not lease > 0:
            raise ConfigurationError(
                f"concurrency_lease_ttl must be a positive number of seconds, not {lease!r}"
            )

    def _check_security(self) -> None:
        from .signing import signer_from  # here: signing imports errors only, but lazily

        signer = signer_from(self.signing_key)  # a short or malformed key fails here
        # Unpickling runs code chosen by whoever wrote the bytes; only a MAC proves they hold
        # the key, rather than merely being able to write to the broker. (The App enforces
        # this; a MessageCodec built by hand is the caller's own responsibility.)
        if signer is None and "pickle" in self.accept_content:
            raise ConfigurationError(
                "accept_content lists 'pickle', which runs code from the message: it is refused "
                "unless signing_key is set (then only holders of the key can send pickles)"
            )
        self.limits()

    def limits(self) -> Limits:
        """The settings of the table in :mod:`aioqueue.input_limits`, checked."""
        from .input_limits import Limits

        return Limits(
            max_message_size=self.max_message_size,
            max_nesting_depth=self.max_nesting_depth,
            max_task_name_length=self.max_task_name_length,
            max_headers=self.max_headers,
            max_headers_size=self.max_headers_size,
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
    if name == "task_routes":  # JSON in the environment: {"billing.*": "billing"}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ConfigurationError(
                f"environment setting for 'task_routes' is not JSON: {exc}"
            ) from exc
    if name in ("worker_max_tasks_per_child", "worker_metrics_port"):
        return int(raw) if raw else None
    return _security_text(name, raw)


def _security_text(name: str, raw: str) -> Any:
    """The security settings' environment forms (other text settings pass through)."""
    if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):  # a file path
        return raw or None
    if name == "signing_key":  # several keys (rotation) are separated by commas
        return [key for key in raw.split(",") if key]
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
    except ValueError:
        return MASK
    try:
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
        if "," not in parts.netloc:
            return MASK
        # several hosts (``amqp://u:pw@h1:1,h2:2/``): no single port to parse
        userinfo, at, hosts = parts.netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hosts}" if at and colon else parts.netloc
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

"""TLS that fails closed, for ``rediss://``, ``rediss+cluster://`` and ``amqps://``.

A TLS connection that does not check who answers only hides traffic from a passive listener;
whoever sits in between reads and writes every task. So both schemes verify the server's
certificate *and* its host name by default, against the system's CAs or ``ssl_ca_certs``.

Where the options come from, the URL winning over the settings::

    setting          URL query (either spelling)              meaning
    ssl_ca_certs     ssl_ca_certs=, cafile= (amqps)           CA bundle for a private CA
    ssl_certfile     ssl_certfile=, certfile= (amqps)         client certificate (mutual TLS)
    ssl_keyfile      ssl_keyfile=, keyfile= (amqps)           its private key
    ssl_verify       -                                        False: no verification at all

Turning verification off is only possible through the ``ssl_verify=False`` setting (or
``AIOQUEUE_SSL_VERIFY=false``), and logs a warning at each connection set-up; a URL asking
for it (``ssl_cert_reqs=none``, ``ssl_check_hostname=false``, ``no_verify_ssl=1``) is refused,
so a URL copied from somewhere cannot quietly turn it off.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "TLS_REDIS_SCHEMES",
    "TlsOptions",
    "client_context",
    "split_amqp_tls",
    "switch",
    "with_tls",
]

log = logging.getLogger("aioqueue.tls")

_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_AMQP_SPELLINGS = {"cafile": "ssl_ca_certs", "certfile": "ssl_certfile", "keyfile": "ssl_keyfile"}
_OFF_VALUES = frozenset({"none", "optional", "false", "0", "no", "off", "cert_none"})
_ON_VALUES = frozenset({"required", "true", "1", "yes", "on", "cert_required"})
_VERIFY_PARAMS = ("ssl_cert_reqs", "ssl_check_hostname", "no_verify_ssl")
_NO_VERIFY = "no_verify_ssl"
TLS_REDIS_SCHEMES = frozenset({"rediss", "rediss+cluster"})


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """The TLS options of one connection."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True


def client_context(options: TlsOptions) -> ssl.SSLContext:
    """A client context: the server's certificate and host name checked unless ``verify`` is
    False. Unreadable files are a :class:`ConfigurationError` naming the file."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.ca_certs)
        if options.certfile is not None:
            context.load_cert_chain(options.certfile, options.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the TLS files: {exc}") from exc
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def switch(name: str, value: str) -> bool:
    """An on/off query option (``ssl_check_hostname=true``, ``ssl_cert_reqs=required``) as a
    bool; a value that is neither is a :class:`ConfigurationError`, never a guess."""
    lowered = value.strip().lower()
    if lowered in _ON_VALUES:
        return True
    if lowered in _OFF_VALUES:
        return False
    raise ConfigurationError(f"{name}={value!r} is neither on ({sorted(_ON_VALUES)}) nor off")


def _refuse_off_switch(name: str, value: str, verify: bool, url_for_errors: str) -> None:
    lowered = value.strip().lower()
    # no_verify_ssl=1 means off; for the others a false-ish value does
    off = lowered in _ON_VALUES if name == _NO_VERIFY else lowered in _OFF_VALUES
    if off and verify:
        raise ConfigurationError(
            f"{url_for_errors}: the URL's {name}={value} would turn TLS verification off; "
            "that needs the explicit setting ssl_verify=False (and is then logged)"
        )


def with_tls(url: str, conf: Config) -> str:
    """``url`` with the app's TLS settings folded into its query, verification explicit.

    Only ``rediss://``, ``rediss+cluster://`` and ``amqps://`` URLs change; every client made
    from the result (redis-py pools and cluster clients, the batcher's link, the lease thread,
    the result listener, aio-pika) then verifies the same way.
    """
    scheme = _scheme(url)
    if scheme not in TLS_REDIS_SCHEMES and scheme != "amqps":
        return url
    from .config import mask_url

    parts = urlsplit(url)
    verify = conf.ssl_verify is not False
    given: dict[str, str] = {}
    kept: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        canonical = _AMQP_SPELLINGS.get(name, name) if scheme == "amqps" else name
        if canonical in _FILES:
            given[canonical] = value
        elif canonical in _VERIFY_PARAMS:
            _refuse_off_switch(canonical, value, verify, mask_url(url))
        else:
            kept.append((name, value))
    for name in _FILES:
        setting = getattr(conf, name)
        if name not in given and setting:
            given[name] = str(setting)
    if not verify:
        log.warning(
            "TLS verification is OFF for %s (ssl_verify=False): anyone on the path can read "
            "and forge every message",
            mask_url(url),
        )
    kept += sorted(given.items())
    if scheme in TLS_REDIS_SCHEMES:
        kept += [
            ("ssl_cert_reqs", "required" if verify else "none"),
            ("ssl_check_hostname", "true" if verify else "false"),
        ]
    elif not verify:
        kept.append((_NO_VERIFY, "1"))
    return urlunsplit(parts._replace(query=urlencode(kept)))


def split_amqp_tls(url: str) -> tuple[str, ssl.SSLContext | None]:
    """An ``amqps://`` URL without its TLS query options, and the context they make.

    aio-pika gets the context itself (``ssl_context=``), so it verifies exactly as
    :func:`client_context` says rather than by its own query parsing. Other URLs: unchanged.
    """
    if _scheme(url) != "amqps":
        return url, None
    parts = urlsplit(url)
    files: dict[str, str] = {}
    verify = True
    kept: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        canonical = _AMQP_SPELLINGS.get(name, name)
        if canonical in _FILES:
            files[canonical] = value
        elif canonical == _NO_VERIFY:
            verify = value.strip().lower() not in _ON_VALUES
        else:
            kept.append((name, value))
    options = TlsOptions(
        ca_certs=files.get("ssl_ca_certs"),
        certfile=files.get("ssl_certfile"),
        keyfile=files.get("ssl_keyfile"),
        verify=verify,
    )
    return urlunsplit(parts._replace(query=urlencode(kept))), client_context(options)

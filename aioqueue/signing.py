"""Message signing: an HMAC-SHA256 over the exact bytes of every body that crosses a broker.

Why: a worker runs whatever arrives on its queues, so anyone who can write to Redis or RabbitMQ
can otherwise make every worker run any registered task with any arguments, forge results and
revoke tasks. With ``signing_key`` set, every task message, stored or pushed outcome and control
command carries a MAC of its bytes, and a reader refuses a body without a valid one *before it
parses it* (:func:`hmac.compare_digest`, constant time). Only holders of a key can then make a
worker do anything.

Format: the signed body is the JSON body followed by ``\\n`` and the 64 hex digits of
``HMAC-SHA256(key, body)``. orjson never writes a raw newline, so the trailer cannot be confused
with the JSON, and the body still starts with the envelope's first bytes (brokers read a
priority there without decoding). The Redis broker marks a message it takes back from a dead
worker by rewriting its start to ``{"attempt":N,``; the MAC is checked on the original bytes,
rebuilt by undoing that mark (the attempt number alone is not covered: a broker writer can only
make a message look tried more often, which ``max_attempts`` turns into a dead letter).

Key rotation: ``signing_key`` is one key or a list; the first signs, every one verifies. Deploy
the new key second everywhere, then first, then drop the old one.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from typing import Final

from .errors import BadSignature, ConfigurationError

__all__ = ["MIN_KEY_BYTES", "Signer", "looks_signed", "signer_from"]

MIN_KEY_BYTES: Final = 16
"""Shortest key accepted: a shorter HMAC key is guessable offline from one signed message."""

_TRAILER: Final = 65  # b"\n" + 64 hex digits
_ATTEMPT_MARK = re.compile(rb'^\{"attempt":\d+,')


class Signer:
    """Signs with the first key, verifies with any of them."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigurationError("signing_key: give at least one key")
        self._keys = tuple(keys)

    def sign(self, body: bytes) -> bytes:
        """``body`` with its trailer: ``\\n`` and the hex MAC."""
        return body + b"\n" + hmac.digest(self._keys[0], body, "sha256").hex().encode("ascii")

    def verify(self, signed: bytes) -> bytes:
        """The body without its trailer, or :class:`BadSignature`.

        Nothing of ``signed`` is parsed before the MAC matched.
        """
        size = len(signed)
        if size < _TRAILER or signed[size - _TRAILER] != 10:  # 10: b"\n"
            raise BadSignature("bad signature: the message is not signed")
        body, mac = signed[: size - _TRAILER], signed[size - _TRAILER + 1 :]
        original = body
        if signed.startswith(b'{"attempt":'):
            mark = _ATTEMPT_MARK.match(body)
            if mark is not None:
                original = b"{" + body[mark.end() :]
        for key in self._keys:
            digest = hmac.digest(key, original, "sha256").hex().encode("ascii")
            if hmac.compare_digest(digest, mac):
                return body
        raise BadSignature("bad signature: the MAC does not match any signing key")

    def strip(self, signed: bytes) -> bytes:
        """The body without its trailer, unverified: only to find an address to report to."""
        size = len(signed)
        if size >= _TRAILER and signed[size - _TRAILER] == 10:
            return signed[: size - _TRAILER]
        return signed

    def __repr__(self) -> str:
        return f"Signer(<{len(self._keys)} key(s)>)"


_HEX = frozenset(b"0123456789abcdef")


def looks_signed(body: bytes) -> bool:
    """True when ``body`` ends in a signature trailer (to explain a failed parse, not to trust)."""
    size = len(body)
    return size > _TRAILER and body[size - _TRAILER] == 10 and _HEX.issuperset(body[-64:])


def signer_from(value: object) -> Signer | None:
    """The Signer for the ``signing_key`` setting (None: signing is off).

    A ``str`` or ``bytes`` is one key, a list or tuple several (the first signs). The
    ``AIOQUEUE_SIGNING_KEY`` variable holds one key or several separated by commas.
    """
    if value is None or value == "" or value == ():
        return None
    items = [value] if isinstance(value, str | bytes) else value
    if not isinstance(items, list | tuple):
        raise ConfigurationError(
            f"signing_key must be a str, bytes or a list of them, not {type(value).__name__}"
        )
    keys = []
    for item in items:
        key = item.encode() if isinstance(item, str) else item
        if not isinstance(key, bytes):
            raise ConfigurationError(
                f"signing_key: each key must be a str or bytes, not {type(item).__name__}"
            )
        if len(key) < MIN_KEY_BYTES:
            raise ConfigurationError(
                f"signing_key: a key of {len(key)} bytes is too short to be secret "
                f"(at least {MIN_KEY_BYTES}; use secrets.token_hex(32))"
            )
        keys.append(key)
    return Signer(keys)

"""The one argument the send-after-commit helpers take: a bound call, ``task.s(...)``."""

from __future__ import annotations

from typing import Any

from ..task import Signature


def require_signature(call: object, helper: str) -> Signature[Any, Any]:
    """``call`` if it is a Signature; a clear TypeError now (not at commit, when the request
    that made the mistake is gone) otherwise."""
    if not isinstance(call, Signature):
        raise TypeError(
            f"{helper}() takes a bound call such as add.s(2, 3) or "
            f"add.options(countdown=5).s(2, 3), not {type(call).__name__}"
        )
    return call

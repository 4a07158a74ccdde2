"""Asking workers what they do: ``await app.control.inspect().active()`` and friends.

Each call is one request on the app's control bus (see :mod:`aioqueue._control_bus`) and a
bounded wait for the replies: it returns once every worker listening when it asked has answered,
or after ``timeout`` seconds with the answers that came. The result maps worker id to that
worker's answer; a worker that could not answer maps to ``{"error": "..."}``. Arguments of tasks
and settings come back with secrets masked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .control import Control

__all__ = ["DEFAULT_TIMEOUT", "Answers", "Inspect", "destinations", "request"]

DEFAULT_TIMEOUT = 1.0
"""Seconds to wait for workers' replies when no timeout is given."""


class Answers(dict[str, Any]):
    """{worker id: answer}; ``everyone``: every worker listening when asked answered (else
    some did not within the timeout, or they could not be counted)."""

    everyone: bool = False


def destinations(destination: str | Sequence[str] | None) -> list[str] | None:
    """A list of worker ids from one id, several, or None (every worker)."""
    if destination is None:
        return None
    if isinstance(destination, str):
        return [destination]
    ids = [str(item) for item in destination]
    if not ids:
        raise ConfigurationError("destination: give at least one worker id, or None for all")
    return ids


async def request(
    control: Control,
    method: str,
    arguments: dict[str, Any] | None = None,
    *,
    destination: str | Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Answers:
    """Send ``method`` to the workers; {worker id: answer} of those that replied in time."""
    if not timeout > 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds, not {timeout!r}")
    ids = destinations(destination)
    command = {
        "verb": "request",
        "id": uuid.uuid4().hex,
        "method": method,
        "arguments": arguments or {},
        "destination": ids,
        "expires": time.time() + timeout,
    }
    replies = await control.bus().request(command, timeout, None if ids is None else len(ids))
    answers = Answers()
    for reply in sorted(replies, key=lambda reply: str(reply.get("worker"))):
        worker = str(reply.get("worker"))
        answers[worker] = reply["result"] if "result" in reply else {"error": reply.get("error")}
    answers.everyone = getattr(replies, "everyone", False)
    return answers


class Inspect:
    """Read-only questions to workers: ``await app.control.inspect(timeout=2).stats()``."""

    def __init__(
        self,
        control: Control,
        destination: str | Sequence[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._control = control
        self.destination = destinations(destination)
        self.timeout = timeout

    async def _ask(self, method: str) -> Answers:
        return await request(
            self._control, method, destination=self.destination, timeout=self.timeout
        )

    async def ping(self) -> Answers:
        """{worker id: "pong"} for each worker that is alive and listening."""
        return await self._ask("ping")

    async def active(self) -> Answers:
        """Tasks running now: id, name, queue, args (masked), attempt, started, runtime."""
        return await self._ask("active")

    async def scheduled(self) -> Answers:
        """Messages a worker holds for a later eta (they hold no slot)."""
        return await self._ask("scheduled")

    async def reserved(self) -> Answers:
        """Messages a worker took into a slot but has not started yet."""
        return await self._ask("reserved")

    async def registered(self) -> Answers:
        """The tasks each worker knows: name, queue, executor."""
        return await self._ask("registered")

    async def stats(self) -> Answers:
        """Counters: uptime, queues, concurrency, free slots, processed, returned, ..."""
        return await self._ask("stats")

    async def holding(self) -> Answers:
        """Per queue, what each worker holds unsettled: ``held``, ``oldest_sent_at``,
        ``undated`` (what ``aioqueue queues`` sums where the broker cannot count)."""
        return await self._ask("holding")

    async def conf(self) -> Answers:
        """The settings each worker runs with, secrets masked."""
        return await self._ask("conf")

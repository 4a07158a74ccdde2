"""Redis plumbing shared by the Redis broker and the Redis result backend.

The one idea here is :class:`CommandBatcher`: every coroutine that wants a write hands it a
small "stage" function; whatever accumulates while the previous round trip is in flight goes out
as the next pipeline. Many concurrent sends, acks and result stores then cost one round trip per
batch instead of one each, without any coroutine waiting longer than one round trip extra.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from .config import mask_url
from .errors import AioQueueError, BrokerConnectionError, BrokerError

__all__ = ["CommandBatcher", "connect_redis", "redis_errors_as"]

# redis-py's annotations assume str replies; we speak bytes, so clients are typed loosely.
RedisClient = Any
Stage = Callable[[Any], object]
_MAX_BATCH = 512


def connect_redis(url: str, *, connect_timeout: float, client_name: str) -> RedisClient:
    """A client for ``redis://``, ``rediss://`` or ``unix://`` URLs (connects lazily)."""
    return Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_keepalive=True,
        health_check_interval=30,
        client_name=client_name,
    )


@contextlib.contextmanager
def redis_errors_as(
    url: str,
    error: type[AioQueueError] = BrokerError,
    connection_error: type[AioQueueError] = BrokerConnectionError,
    what: str = "broker",
) -> Iterator[None]:
    """Translate redis-py errors into ours at the seam, naming the URL with its password masked."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        _raise(connection_error, f"cannot reach {what} at {mask_url(url)}: {exc}", exc)
    except redis_errors.RedisError as exc:
        _raise(error, f"{what} at {mask_url(url)} failed: {exc}", exc)


def _raise(kind: type[AioQueueError], message: str, cause: BaseException) -> NoReturn:
    raise kind(message) from cause


class CommandBatcher:
    """Coalesces concurrent writes into pipelines, one round trip in flight at a time.

    Order is kept: stages go out in the order they were submitted, and a batch is only sent
    after the previous one was answered, so a STARTED write can never overtake a SUCCESS.
    """

    def __init__(
        self, client: RedisClient, translate: Callable[[], contextlib.AbstractContextManager[None]]
    ) -> None:
        self._client = client
        self._translate = translate
        self._pending: list[tuple[Stage, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, stage: Stage) -> asyncio.Future[Any]:
        """Queue ``stage``; the future gets its last command's reply (or its error)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((stage, future))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return future

    async def run(self, stage: Stage) -> Any:
        return await self.submit(stage)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:_MAX_BATCH]
                del self._pending[:_MAX_BATCH]
                await self._send(batch)
        finally:
            self._flusher = None

    async def _send(self, batch: list[tuple[Stage, asyncio.Future[Any]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        ends = []
        for stage, _ in batch:
            stage(pipe)
            ends.append(len(pipe.command_stack))
        try:
            with self._translate():
                replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for (_, future), end in zip(batch, ends, strict=True):
            stage_replies = replies[start:end]
            start = end
            if future.done():  # the submitter was cancelled; its write still happened
                continue
            failed = next((r for r in stage_replies if isinstance(r, Exception)), None)
            if failed is not None:
                future.set_exception(self._translated(failed))
            else:
                future.set_result(stage_replies[-1] if stage_replies else None)

    def _translated(self, exc: Exception) -> Exception:
        try:
            with self._translate():
                raise exc
        except Exception as translated:
            return translated
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

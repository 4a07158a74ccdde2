"""send_after_commit on a real AsyncSession (aiosqlite) over the real Redis broker: a commit
sends once and the worker finds the committed row; a rollback, of the transaction or of the
savepoint the send was registered in, sends nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import REDIS_URL, delete_prefixed, require_server, running_worker
from sqlalchemy import Integer, String, create_engine, select, update
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from aioqueue import App, BrokerConnectionError, Task
from aioqueue.contrib.sqlalchemy import flush_sends, send_after_commit
from aioqueue.sync import run_sync, sync_client


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(20))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
async def app(key_prefix: str) -> AsyncIterator[App]:
    require_server(REDIS_URL, "Redis")
    app = App("sqlalchemy-contrib", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix)
    async with app:
        yield app
    await delete_prefixed(REDIS_URL, key_prefix)


def confirm_task(app: App, engine: AsyncEngine) -> Task[[int], int]:
    @app.task(name="orders.confirm")
    async def confirm(order_id: int) -> int:
        """Marks the order; how many rows it found (0: the row was not committed)."""
        async with AsyncSession(engine) as session, session.begin():
            done = await session.execute(
                update(Order).where(Order.id == order_id).values(status="confirmed")
            )
            return int(done.rowcount)  # type: ignore[attr-defined]

    return confirm


async def queued(app: App) -> int:
    return await app.broker.queue_length(app.conf.default_queue)


async def test_commit_sends_once_and_the_worker_finds_the_row(
    app: App, engine: AsyncEngine
) -> None:
    confirm = confirm_task(app, engine)
    async with AsyncSession(engine) as session:
        session.add(Order(id=1, status="new"))
        send_after_commit(session, confirm.s(1))
        await session.flush()
        assert await flush_sends(session) == []
        assert await queued(app) == 0  # not before the commit
        await session.commit()
        [result] = await flush_sends(session)
        assert await queued(app) == 1
        await session.commit()  # a later commit does not send it again
        assert await flush_sends(session) == []
        assert await queued(app) == 1
    async with running_worker(app):
        assert await result.get(timeout=10) == 1
    async with AsyncSession(engine) as session:
        assert (await session.get(Order, 1)) is not None
        assert (await session.scalar(select(Order.status).where(Order.id == 1))) == "confirmed"


async def test_session_begin_block_sends_on_exit(app: App, engine: AsyncEngine) -> None:
    confirm = confirm_task(app, engine)
    sessions = async_sessionmaker(engine)
    async with sessions() as session:
        async with session.begin():
            session.add(Order(id=7, status="new"))
            send_after_commit(session, confirm.s(7).set(task_id="order-7"))
        assert [r.id for r in await flush_sends(session)] == ["order-7"]
    assert await queued(app) == 1


async def test_rollback_sends_nothing(app: App, engine: AsyncEngine) -> None:
    confirm = confirm_task(app, engine)
    async with AsyncSession(engine) as session:
        session.add(Order(id=2, status="new"))
        send_after_commit(session, confirm.s(2))
        await session.rollback()
        await session.commit()  # nothing left to send
        assert await flush_sends(session) == []
    with pytest.raises(RuntimeError, match="declined"):
        async with AsyncSession(engine) as session, session.begin():
            session.add(Order(id=3, status="new"))
            send_after_commit(session, confirm.s(3))
            raise RuntimeError("declined")
    assert await queued(app) == 0
    async with AsyncSession(engine) as session:
        assert (await session.get(Order, 2)) is None
        assert (await session.get(Order, 3)) is None


async def test_failed_commit_sends_nothing(app: App, engine: AsyncEngine) -> None:
    confirm = confirm_task(app, engine)
    async with AsyncSession(engine) as session, session.begin():
        session.add(Order(id=4, status="new"))
    async with AsyncSession(engine) as session:
        session.add(Order(id=4, status="duplicate"))  # primary key taken: the commit fails
        send_after_commit(session, confirm.s(4))
        with pytest.raises(Exception, match="UNIQUE"):
            await session.commit()
        await session.rollback()
        await session.commit()
        assert await flush_sends(session) == []
    assert await queued(app) == 0


async def test_savepoint_rollback_drops_only_its_sends(app: App, engine: AsyncEngine) -> None:
    confirm = confirm_task(app, engine)
    async with AsyncSession(engine) as session:
        send_after_commit(session, confirm.s(5).set(task_id="kept"))
        nested = await session.begin_nested()
        send_after_commit(session, confirm.s(6).set(task_id="dropped"))
        inner = await session.begin_nested()
        send_after_commit(session, confirm.s(6).set(task_id="dropped-too"))
        await inner.commit()
        await nested.rollback()
        send_after_commit(session, confirm.s(5).set(task_id="after"))
        await session.commit()
        assert [r.id for r in await flush_sends(session)] == ["kept", "after"]
    assert await queued(app) == 2


async def test_a_failed_send_is_raised_by_flush(engine: AsyncEngine, key_prefix: str) -> None:
    down = App("sqlalchemy-down", broker="redis://127.0.0.1:1/0", key_prefix=key_prefix)
    down.conf.broker_connect_timeout = 0.5
    confirm = confirm_task(down, engine)
    async with AsyncSession(engine) as session:
        send_after_commit(session, confirm.s(1))
        await session.commit()
        with pytest.raises(BrokerConnectionError):
            await flush_sends(session)
    await down.close()


async def test_only_a_bound_call_is_accepted(engine: AsyncEngine, app: App) -> None:
    confirm = confirm_task(app, engine)
    async with AsyncSession(engine) as session:
        with pytest.raises(TypeError, match=r"add\.s\(2, 3\)"):
            send_after_commit(session, confirm)  # type: ignore[arg-type]


def test_plain_session_sends_before_commit_returns(tmp_path: Path, key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    app = App("sqlalchemy-sync", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix)

    @app.task(name="orders.noop")
    async def noop(order_id: int) -> int:
        return order_id

    engine = create_engine(f"sqlite:///{tmp_path / 'sync.sqlite3'}")
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as session:
            session.add(Order(id=1, status="new"))
            send_after_commit(session, noop.s(1))
            session.rollback()
            session.add(Order(id=2, status="new"))
            send_after_commit(session, noop.s(2))
            assert run_sync(app, "queued", app.broker.queue_length, "default") == 0
            session.commit()
            assert run_sync(app, "queued", app.broker.queue_length, "default") == 1
    finally:
        engine.dispose()
        sync_client(app).close()
        asyncio.run(delete_prefixed(REDIS_URL, key_prefix))

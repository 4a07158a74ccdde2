"""Periodic tasks: schedules, DST, claims shared by schedulers, missed ticks, the listing.

Time is injected: a Scheduler's ``start_at(now)`` and ``step(now)`` take the clock as an
argument, so cron minutes, DST days and hour-long outages are stepped through, not waited for.
Claims and sends go to the real transport of each contract run (see conftest.TRANSPORTS).
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
from conftest import AMQP_URL, AppFactory, require_server, running_worker, wait_until

from aioqueue import App, ConfigurationError, Context, States, crontab
from aioqueue.periodic import Cron, Every, Scheduler, tick_id
from aioqueue.periodic.amqp_lease import AmqpLeaseClaims
from aioqueue.periodic.claims import RedisClaims, claim_ttl
from aioqueue.periodic.listing import describe, format_rows

pytestmark = pytest.mark.timeout(60)

NY = ZoneInfo("America/New_York")
SHANGHAI = ZoneInfo("Asia/Shanghai")
T0 = 1_800_000_000.0  # a whole minute (and hour) of the Unix clock


def local(tz: ZoneInfo, *parts: int, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=tz, fold=fold).timestamp()  # type: ignore[misc]


def shown(t: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(t, tz).isoformat()


async def delete_lease_queues(key_prefix: str) -> None:
    """The AMQP lease's queues are the schedule's state and outlive apps: tests delete them."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        for name in (f"{key_prefix}.beat.lock", f"{key_prefix}.beat.state"):
            channel = await connection.channel()
            await channel.queue_delete(name)
    finally:
        await connection.close()


@pytest.fixture(autouse=True)
async def lease_cleanup(request: pytest.FixtureRequest, key_prefix: str) -> Any:
    yield
    transport = (
        request.node.callspec.params.get("transport") if hasattr(request.node, "callspec") else None
    )
    if transport == "amqp-rpc":
        await delete_lease_queues(key_prefix)


async def settled(*schedulers: Scheduler) -> None:
    """Started; with the AMQP lease, once one of them holds it (RabbitMQ hands it over)."""
    leases = [s.claims for s in schedulers if isinstance(s.claims, AmqpLeaseClaims)]
    if leases:

        async def held() -> bool:
            return any(lease.holding() for lease in leases)

        await wait_until(held, timeout=10)


def recording_app(app: App) -> tuple[App, list[str]]:
    ran: list[str] = []

    @app.task(name="periodic.record", bind=True)
    async def record(ctx: Context, label: str = "") -> str:
        ran.append(ctx.id)
        return label

    return app, ran


# -- schedules: pure time arithmetic -------------------------------------------------------


def test_every_is_aligned_to_the_unix_clock_and_does_not_drift() -> None:
    every = Every(30)
    assert every.next_after(T0 + 0.001) == T0 + 30
    assert every.next_after(T0) == T0 + 30
    assert every.latest_at(T0 + 29.999) == T0
    assert every.previous_before(T0) == T0 - 30
    due, count = T0, 0
    while due < T0 + 86400:
        due = every.next_after(due)
        count += 1
    assert due == T0 + 86400 and count == 2880  # no accumulated float error over a day


def test_cron_reads_the_wall_clock_of_its_zone() -> None:
    cron = Cron("0 7 * * mon-fri", "Asia/Shanghai")
    friday_evening = local(SHANGHAI, 2026, 6, 5, 20, 0)
    due = cron.next_after(friday_evening)
    assert shown(due, SHANGHAI) == "2026-06-08T07:00:00+08:00"  # Monday, 23:00 UTC on Sunday
    assert datetime.fromtimestamp(due, ZoneInfo("UTC")).hour == 23


def test_spring_forward_runs_a_skipped_wall_time_once_shifted_by_the_gap() -> None:
    cron = Cron("30 2 * * *", "America/New_York")
    dues = [cron.next_after(local(NY, 2026, 3, 7, 12, 0))]
    for _ in range(2):
        dues.append(cron.next_after(dues[-1]))
    assert [shown(d, NY) for d in dues] == [
        "2026-03-08T03:30:00-04:00",  # 02:30 does not exist that day: once, an hour later
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]


def test_fall_back_runs_a_repeated_wall_time_once_at_its_first_occurrence() -> None:
    cron = Cron("30 1 * * *", "America/New_York")
    first = cron.next_after(local(NY, 2026, 10, 31, 12, 0))
    assert shown(first, NY) == "2026-11-01T01:30:00-04:00"  # EDT: the first 01:30
    assert shown(cron.next_after(first), NY) == "2026-11-02T01:30:00-05:00"


def test_frequent_cron_keeps_each_instant_once_across_both_transitions() -> None:
    cron = Cron("*/15 * * * *", "America/New_York")
    for start in (local(NY, 2026, 3, 8, 0, 0), local(NY, 2026, 11, 1, 0, 0)):
        dues, t = [], start
        while t < start + 6 * 3600:
            t = cron.next_after(t)
            dues.append(t)
        assert dues == sorted(set(dues))  # strictly increasing: nothing twice
        walls = [shown(d, NY)[11:16] for d in dues]
        assert len(walls) == len(set(walls))  # each wall time once (the repeated hour: first)


def test_previous_before_walks_back_over_the_same_instants_as_next_after() -> None:
    cron = Cron("*/20 * * * *", "America/New_York")
    forward, t = [], local(NY, 2026, 3, 8, 0, 0)
    while t < local(NY, 2026, 3, 8, 5, 0):
        t = cron.next_after(t)
        forward.append(t)
    backward = [forward[-1]]
    while len(backward) < len(forward):
        backward.append(cron.previous_before(backward[-1]))
    assert backward[::-1] == forward


def test_crontab_takes_celerys_keywords_and_the_apps_zone() -> None:
    app = App("tz", broker="memory://", timezone="Europe/Paris")

    @app.task
    async def nightly() -> None:
        pass

    name = app.add_periodic_task(crontab(minute=0, hour=0), nightly.s(), name="midnight")
    (entry,) = app.periodic_entries()
    assert entry.name == name == "midnight"
    assert entry.schedule == Cron("0 0 * * *", "Europe/Paris")
    given = crontab(minute="*/5", hour="9-17", day_of_week="mon-fri", tz="Asia/Tokyo")
    assert given == Cron("*/5 9-17 * * mon-fri", "Asia/Tokyo")


# -- declaring: three spellings, bad values refused before any I/O --------------------------


def test_three_spellings_declare_the_same_entry() -> None:
    a, b, c = (App(n, broker="memory://") for n in "abc")

    @a.periodic(every=30, args=(16, 16), name="add-every-30s")
    @a.task(name="proj.add")
    async def add_a(x: int, y: int) -> int:
        return x + y

    @b.task(name="proj.add")
    async def add_b(x: int, y: int) -> int:
        return x + y

    b.add_periodic_task(30.0, add_b.s(16, 16), name="add-every-30s")

    @c.task(name="proj.add")
    async def add_c(x: int, y: int) -> int:
        return x + y

    c.conf.beat_schedule = {
        "add-every-30s": {"task": "proj.add", "schedule": timedelta(seconds=30), "args": (16, 16)}
    }
    entries = [app.periodic_entries() for app in (a, b, c)]
    assert entries[0] == entries[1] == entries[2]
    assert entries[0][0].args == (16, 16) and entries[0][0].schedule == Every(30)


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (lambda app, t: app.periodic(cron="61 * * * *")(t), "invalid cron expression"),
        (lambda app, t: app.periodic(cron="0 7 * * *", tz="Mars/Olympus")(t), "Mars/Olympus"),
        (lambda app, t: app.periodic(every=0)(t), "every must be"),
        (lambda app, t: app.periodic(every=1, cron="* * * * *")(t), "exactly one schedule"),
        (lambda app, t: app.periodic(every=1, missed="later")(t), "'later'"),
        (
            lambda app, t: app.periodic(every=1, missed="catch_up", catch_up_limit=0)(t),
            "at least 1",
        ),
        (lambda app, t: app.periodic(every=1, task_id="x")(t), "task_id"),
        (lambda app, t: app.periodic(every=1, queue="")(t), "queue"),
        (lambda app, t: app.periodic(every=1)(t.fn), "goes above @app.task"),
        (lambda app, t: app.add_periodic_task(5, t), "signature"),
        (lambda app, t: app.add_periodic_task("often", t.s()), "'often'"),
    ],
)
def test_bad_declarations_are_refused_naming_the_value(declare: Any, message: str) -> None:
    app = App("bad", broker="memory://")

    @app.task
    async def job() -> None:
        pass

    with pytest.raises(ConfigurationError, match=message):
        declare(app, job)


def test_bad_beat_schedule_is_refused_when_the_worker_is_built() -> None:
    app = App("bad", broker="memory://")
    app.conf.beat_schedule = {"x": {"task": "t", "schedule": 5, "relative": True}}
    with pytest.raises(ConfigurationError, match="relative"):
        app.worker()


def test_the_same_entry_declared_twice_needs_names() -> None:
    app = App("twice", broker="memory://")

    @app.task
    async def job() -> None:
        pass

    app.periodic(every=5)(job)
    with pytest.raises(ConfigurationError, match="declared twice"):
        app.periodic(every=5)(job)
    app.periodic(every=5, name="second")(job)
    assert len(app.periodic_entries()) == 2


def test_no_drift_over_an_hour_of_late_wakeups() -> None:
    async def run() -> list[float]:
        app, _ = recording_app(App("drift", broker="memory://"))
        app.periodic(every=1, name="second")(app.tasks["periodic.record"])
        scheduler = Scheduler(app)
        rng = random.Random(7)
        await scheduler.start_at(T0 - 0.5)
        dues = []
        while True:
            wake = scheduler.next_wake()
            assert wake is not None
            if wake > T0 + 3600:
                break
            for tick in await scheduler.step(wake + rng.uniform(0.0, 0.9)):
                dues.append(tick.due)
        await app.close()
        return dues

    dues = asyncio.run(run())
    assert dues == [T0 + i for i in range(3601)]


def test_burst_and_no_schedule_workers_do_not_schedule() -> None:
    app = App("off", broker="memory://")

    @app.periodic(every=1)
    @app.task
    async def job() -> None:
        pass

    assert app.worker()._scheduler is not None
    assert app.worker(schedule=False)._scheduler is None
    assert app.worker(burst=True)._scheduler is None


# -- the contract: every transport ----------------------------------------------------------


async def test_cron_fires_at_the_right_minute_in_its_zone(make_app: AppFactory) -> None:
    app, ran = recording_app(make_app())
    app.periodic(cron="30 7 * * *", tz="Asia/Shanghai", name="report", args=("r",))(
        app.tasks["periodic.record"]
    )
    scheduler = Scheduler(app)
    due = local(SHANGHAI, 2026, 6, 1, 7, 30)
    await scheduler.start_at(due - 50)
    await settled(scheduler)
    try:
        assert await scheduler.step(due - 0.01) == []
        (tick,) = await scheduler.step(due + 0.003)
        assert (tick.entry, tick.due, tick.task_id) == ("report", due, tick_id("report", due))
        assert await scheduler.step(due + 59) == []
        assert scheduler.next_wake() == local(SHANGHAI, 2026, 6, 2, 7, 30)
        async with running_worker(app):

            async def done() -> bool:
                return tick.task_id in ran

            await wait_until(done)
    finally:
        await scheduler.claims.close()


@pytest.mark.parametrize(
    ("cron", "day", "hours", "expected"),
    [
        ("30 2 * * *", (2026, 3, 8), 5, "2026-03-08T03:30:00-04:00"),
        ("30 1 * * *", (2026, 11, 1), 5, "2026-11-01T01:30:00-04:00"),
    ],
    ids=["spring-forward", "fall-back"],
)
async def test_dst_day_runs_the_job_once(
    make_app: AppFactory, cron: str, day: tuple[int, int, int], hours: int, expected: str
) -> None:
    app, _ = recording_app(make_app())
    app.periodic(cron=cron, tz="America/New_York", name="nightly")(app.tasks["periodic.record"])
    scheduler = Scheduler(app)
    start = local(NY, *day, 0, 0)
    await scheduler.start_at(start)
    await settled(scheduler)
    try:
        ticks = []
        for minute in range(1, hours * 60 + 1):  # a step every minute of real (UTC) time
            ticks += await scheduler.step(start + 60 * minute + 0.5)
        assert [shown(t.due, NY) for t in ticks] == [expected]
    finally:
        await scheduler.claims.close()


async def test_two_schedulers_send_each_tick_once(make_app: AppFactory) -> None:
    app, _ = recording_app(make_app())
    app.periodic(every=1, name="second")(app.tasks["periodic.record"])
    first, second = Scheduler(app), Scheduler(app)
    for scheduler in (first, second):
        await scheduler.start_at(T0 - 0.5)
    await settled(first, second)
    try:
        sent = []
        for i in range(30):
            order = (first, second) if i % 2 else (second, first)
            for scheduler in order:
                sent += await scheduler.step(T0 + i + 0.01 * (order.index(scheduler) + 1))
        # A scheduler that wakes late (or whose clock lags) does not send an old tick again.
        lagging = Scheduler(app)
        await lagging.start_at(T0 + 9.5)
        try:
            assert await lagging.step(T0 + 10.5) == []
        finally:
            await lagging.claims.close()
        assert sorted(t.due for t in sent) == [T0 + i for i in range(30)]
    finally:
        await first.claims.close()
        await second.claims.close()


async def test_skip_and_catch_up_after_an_hour_long_outage(make_app: AppFactory) -> None:
    app, _ = recording_app(make_app())
    record = app.tasks["periodic.record"]
    app.periodic(every=60, name="skipper")(record)
    app.periodic(every=60, name="catcher", missed="catch_up", catch_up_limit=10)(record)
    before = Scheduler(app)
    await before.start_at(T0 - 0.5)
    await settled(before)
    try:
        assert {t.due for t in await before.step(T0 + 0.01)} == {T0}
        assert len(await before.step(T0 + 60.01)) == 2
    finally:
        await before.claims.close()
    # Nothing runs for an hour; then a scheduler starts half a minute after a due tick.
    now = T0 + 60 + 3600 + 30
    after = Scheduler(app)
    await after.start_at(now)
    await settled(after)
    try:
        ticks = await after.step(now)
        assert [t.entry for t in ticks] == ["catcher"] * 10
        assert [t.due for t in ticks] == [T0 + 60 * k for k in range(52, 62)]  # the latest ten
        ticks = await after.step(T0 + 60 * 62 + 0.01)
        assert sorted((t.entry, t.due) for t in ticks) == [
            ("catcher", T0 + 3720),
            ("skipper", T0 + 3720),
        ]
    finally:
        await after.claims.close()


async def test_catch_up_resends_nothing_already_sent(make_app: AppFactory) -> None:
    app, _ = recording_app(make_app())
    app.periodic(every=60, name="catcher", missed="catch_up")(app.tasks["periodic.record"])
    first = Scheduler(app)
    await first.start_at(T0 - 0.5)
    await settled(first)
    try:
        assert len(await first.step(T0 + 0.01)) == 1
    finally:
        await first.claims.close()
    restarted = Scheduler(app)  # a quick restart: no tick was missed
    await restarted.start_at(T0 + 30)
    await settled(restarted)
    try:
        assert await restarted.step(T0 + 30) == []
        assert [t.due for t in await restarted.step(T0 + 60.01)] == [T0 + 60]
    finally:
        await restarted.claims.close()


@pytest.mark.parametrize("transport", ["redis", "amqp-rpc"])
async def test_a_ticks_id_is_held_for_its_interval_not_for_the_result_ttl(
    make_app: AppFactory, key_prefix: str, transport: str, redis_url: str
) -> None:
    """Every tick claims its id; held for a day (the result TTL), a 1-second schedule would
    keep 86,400 claims alive: Redis keys, or on rpc:// as many RabbitMQ queues, each holding a
    file of the broker's open. Held for the tick's own window, a tick that ran frees it within
    its interval."""
    app, ran = recording_app(make_app())
    app.periodic(every=1, name="short")(app.tasks["periodic.record"])
    scheduler = Scheduler(app)
    await scheduler.start_at(T0 - 0.5)
    await settled(scheduler)
    try:
        (tick,) = await scheduler.step(T0 + 0.01)
    finally:
        await scheduler.claims.close()
    async with running_worker(app):

        async def ran_once() -> bool:
            return tick.task_id in ran

        await wait_until(ran_once)
        if transport == "redis":

            async def stored() -> bool:
                return await app.AsyncResult(tick.task_id).state() == States.SUCCESS

            await wait_until(stored)
            client = aioredis.Redis.from_url(redis_url)
            try:
                held_ms = await client.pttl(f"{key_prefix}:claim:{tick.task_id}")
            finally:
                await client.aclose()
            assert held_ms <= 1000, f"the tick's id is held for {held_ms} ms"
        else:

            async def claim_queue_gone() -> bool:
                return not await queue_exists(f"{key_prefix}.claim.{tick.task_id}")

            # A passive declare renews the queue's x-expires: look less often than it lasts.
            await wait_until(claim_queue_gone, timeout=8, interval=1.5)


async def queue_exists(name: str) -> bool:
    import aio_pika
    from aio_pika.exceptions import ChannelNotFoundEntity

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except ChannelNotFoundEntity:
            return False
        return True
    finally:
        await connection.close()


async def test_schedule_listing_shows_next_due_last_run_and_outcome(
    make_app: AppFactory,
) -> None:
    app, ran = recording_app(make_app())
    record = app.tasks["periodic.record"]
    app.periodic(cron="30 9 * * *", tz="Asia/Shanghai", name="morning")(record)
    app.periodic(every=3600, name="hourly")(record)
    scheduler = Scheduler(app)
    due = local(SHANGHAI, 2026, 6, 1, 9, 30)
    await scheduler.start_at(due - 1)
    await settled(scheduler)
    try:
        (tick,) = await scheduler.step(due + 0.01)
    finally:
        await scheduler.claims.close()
    async with running_worker(app):

        async def done() -> bool:
            return tick.task_id in ran

        await wait_until(done)
        if app.backend.url.startswith("rpc"):
            expected = "unknown (rpc:// results go to the sender only)"
        else:
            expected = States.SUCCESS

            async def stored() -> bool:
                return await app.AsyncResult(tick.task_id).state() == States.SUCCESS

            await wait_until(stored)
        rows = {row.name: row for row in await describe(app, now=due + 60)}
    morning, hourly = rows["morning"], rows["hourly"]
    assert morning.next_due.isoformat() == "2026-06-02T09:30:00+08:00"
    assert morning.last_due is not None and morning.last_due.isoformat() == shown(due, SHANGHAI)
    assert morning.last_task_id == tick.task_id and morning.last_outcome == expected
    assert hourly.last_due is None and hourly.last_outcome is None
    assert hourly.next_due.timestamp() == due + 1800
    table = format_rows(list(rows.values()))
    assert "2026-06-02T09:30:00+08:00" in table and "never" in table


# -- Redis: state left behind expires --------------------------------------------------------


@pytest.mark.parametrize("transport", ["redis"])
async def test_a_removed_entry_leaves_only_expiring_state(
    make_app: AppFactory, raw: Any, key_prefix: str
) -> None:
    app, _ = recording_app(make_app())
    app.periodic(every=60, name="retired")(app.tasks["periodic.record"])
    scheduler = Scheduler(app)
    await scheduler.start_at(T0 - 0.5)
    try:
        assert len(await scheduler.step(T0 + 0.01)) == 1
    finally:
        await scheduler.claims.close()
    assert isinstance(scheduler.claims, RedisClaims)
    ttl = await raw.pttl(scheduler.claims.key("retired"))
    assert 0 < ttl <= claim_ttl(60) * 1000


@pytest.mark.parametrize("transport", ["amqp-rpc"])
async def test_the_lease_holder_renews_its_token_and_keeps_sending(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioqueue.periodic import amqp_lease

    monkeypatch.setattr(amqp_lease, "_RENEW_EVERY", 0.0)  # renew on every claim
    app, _ = recording_app(make_app())
    app.periodic(every=1, name="second")(app.tasks["periodic.record"])
    scheduler = Scheduler(app)
    await scheduler.start_at(T0 - 0.5)
    await settled(scheduler)
    lease = scheduler.claims
    assert isinstance(lease, AmqpLeaseClaims)
    first_token = lease._token
    try:
        sent = []
        for i in range(5):
            sent += await scheduler.step(T0 + i + 0.01)
            assert lease.holding()
        assert [t.due for t in sent] == [T0 + i for i in range(5)]

        async def renewed() -> bool:  # the republished token came back to the holder
            return lease._token is not first_token and lease.holding()

        await wait_until(renewed)
    finally:
        await lease.close()


def test_worker_command_takes_no_schedule() -> None:
    from aioqueue.cli import _parser

    assert _parser().parse_args(["worker", "proj:app"]).schedule is True
    assert _parser().parse_args(["worker", "proj:app", "--no-schedule"]).schedule is False


async def test_claims_under_amqp_reach_a_password_protected_result_redis(
    private_redis: Any, key_prefix: str
) -> None:
    """With an AMQP broker, ticks are claimed in the result backend's Redis. The claims were
    built from the backend's display URL, whose password is masked, so every claim failed
    against a Redis with a password ("invalid password")."""
    import redis.asyncio as aioredis

    from aioqueue.periodic.scheduler import claims_for

    require_server(AMQP_URL, "RabbitMQ")
    admin = aioredis.Redis(port=private_redis.port)
    await wait_until(lambda: _answers(admin), timeout=10)
    await admin.config_set("requirepass", "tick-pw")  # the test's own server, not the shared one
    await admin.aclose()
    backend = f"redis://:tick-pw@127.0.0.1:{private_redis.port}/0"
    app = App("pw", broker=AMQP_URL, backend=backend, key_prefix=key_prefix)
    claims = claims_for(app)
    try:
        assert isinstance(claims, RedisClaims)
        assert await claims.claim("entry", 1000.0, "periodic:entry:1000000", 60.0)
        assert not await claims.claim("entry", 1000.0, "periodic:entry:1000000", 60.0)
        assert "tick-pw" not in repr(app.backend) and "tick-pw" not in app.backend.url
    finally:
        await claims.close()
        await app.close()


async def _answers(client: Any) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False

"""Data people pass: models, dataclasses, datetimes, Decimal, UUID and bytes, rebuilt from hints.

The round trips run on every transport (make_app); the unit tests pin the per-task plan (none
for plain JSON hints) and the serializer registry.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import textwrap
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, NewType

import orjson
import pytest
from conftest import AppFactory, running_worker
from pydantic import BaseModel

from aioqueue import (
    App,
    ConfigurationError,
    InvalidArguments,
    SerializationError,
    register_serializer,
)
from aioqueue.serializers import get_serializer
from aioqueue.typed import plan

pytestmark = pytest.mark.timeout(30)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Line(BaseModel):
    sku: str
    price: Decimal
    count: int = 1


class Order(BaseModel):
    id: uuid.UUID
    placed: dt.datetime
    lines: list[Line]
    note: str | None = None


@dataclass
class Point:
    x: int
    y: int


@dataclass
class Shape:
    name: str
    points: list[Point]
    color: Color
    created: dt.date
    blob: bytes = b""
    tags: set[str] = field(default_factory=set)
    parent: Shape | None = None


class Receipt(BaseModel):
    order: uuid.UUID
    total: Decimal
    at: dt.datetime


def register_typed(app: App) -> dict[str, Any]:
    @app.task(name="typed.total")
    async def total(order: Order, *, discount: Decimal = Decimal("0")) -> Receipt:
        assert isinstance(order, Order) and isinstance(order.lines[0], Line)
        assert isinstance(discount, Decimal)
        amount = sum((line.price * line.count for line in order.lines), Decimal("0"))
        return Receipt(order=order.id, total=amount - discount, at=order.placed)

    @app.task(name="typed.shape", executor="thread")
    def shape(shape: Shape, at: dt.datetime, key: uuid.UUID, raw: bytes) -> Shape:
        assert isinstance(shape.points[0], Point) and isinstance(shape.color, Color)
        assert isinstance(shape.parent, Shape) and isinstance(shape.tags, set)
        assert at.tzinfo is not None and isinstance(key, uuid.UUID) and raw == b"\x00\xff\x10"
        return Shape(
            name=shape.name.upper(),
            points=[*shape.points, Point(at.hour, at.minute)],
            color=Color.BLUE,
            created=shape.created,
            blob=raw,
            tags=shape.tags,
        )

    @app.task(name="typed.pair")
    async def pair(values: tuple[int, Decimal], *more: uuid.UUID) -> tuple[Decimal, int]:
        assert isinstance(values, tuple) and isinstance(values[1], Decimal)
        assert all(isinstance(m, uuid.UUID) for m in more)
        return (values[1], len(more))

    @app.task(name="typed.plain")
    async def plain(x: int, names: list[str], extra: dict[str, Any] | None = None) -> list[int]:
        return [x, len(names)]

    @app.task(name="typed.lies")
    async def lies() -> dt.datetime:
        return "not a datetime"  # type: ignore[return-value]

    return {"total": total, "shape": shape, "pair": pair, "plain": plain, "lies": lies}


def an_order() -> Order:
    return Order(
        id=uuid.uuid4(),
        placed=dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC),
        lines=[Line(sku="apple", price=Decimal("0.10"), count=3), Line(sku="pear", price="2.5")],
    )


async def test_models_and_decimals_round_trip(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_typed(app)
    order = an_order()
    async with app, running_worker(app):
        result = await tasks["total"].send(order, discount=Decimal("0.05"))
        receipt = await result.get(timeout=10)
    assert isinstance(receipt, Receipt)
    assert receipt == Receipt(order=order.id, total=Decimal("2.75"), at=order.placed)


async def test_dataclasses_datetimes_uuids_bytes_on_a_thread(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_typed(app)
    parent = Shape("root", [], Color.RED, dt.date(2026, 1, 1))
    sent = Shape("tri", [Point(0, 0), Point(1, 2)], Color.RED, dt.date(2026, 12, 1),
                 tags={"a", "b"}, parent=parent)  # fmt: skip
    at = dt.datetime(2026, 12, 1, 7, 45, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    async with app, running_worker(app):
        result = await tasks["shape"].send(sent, at, uuid.uuid4(), b"\x00\xff\x10")
        back = await result.get(timeout=10)
    assert back == Shape("TRI", [Point(0, 0), Point(1, 2), Point(7, 45)], Color.BLUE,
                         dt.date(2026, 12, 1), blob=b"\x00\xff\x10", tags={"a", "b"})  # fmt: skip


async def test_tuples_and_star_args(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_typed(app)
    async with app, running_worker(app):
        result = await tasks["pair"].send((1, Decimal("9.99")), uuid.uuid4(), uuid.uuid4())
        assert await result.get(timeout=10) == (Decimal("9.99"), 2)


async def test_arguments_that_do_not_fit_the_hints_are_refused(make_app: AppFactory) -> None:
    """As a real worker refuses arguments that do not bind: FAILURE, kept as a dead letter."""
    app = make_app()
    register_typed(app)
    async with app, running_worker(app):
        bad_model = await app.send_task("typed.total", ({"id": "nope", "lines": []},))
        bad_uuid = await app.send_task("typed.pair", ([1, "2"], "not-a-uuid"))
        with pytest.raises(InvalidArguments, match="argument 'order'"):
            await bad_model.get(timeout=10)
        with pytest.raises(InvalidArguments, match=r"argument '\*args'.*UUID"):
            await bad_uuid.get(timeout=10)


async def test_a_result_that_does_not_fit_its_annotation_says_so() -> None:
    app = App("typed-lies", broker="memory://")
    tasks = register_typed(app)
    async with app, running_worker(app):
        result = await tasks["lies"].send()
        with pytest.raises(SerializationError, match="return annotation"):
            await result.get(timeout=10)
        assert await app.AsyncResult(result.id).get(timeout=10) == "not a datetime"


async def test_apply_rebuilds_too() -> None:
    app = App("typed-apply", broker="memory://")
    tasks = register_typed(app)
    receipt = await (await tasks["total"].apply(an_order())).get()
    assert isinstance(receipt, Receipt) and receipt.total == Decimal("2.80")


async def test_a_fastapi_handler_sends_the_model_it_received() -> None:
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    app = App("typed-fastapi", broker="memory://")
    tasks = register_typed(app)
    api = fastapi.FastAPI()

    @api.post("/orders")
    async def place(order: Order) -> dict[str, str]:
        result = await tasks["total"].send(order)
        return {"task_id": result.id}

    async with app, running_worker(app):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = orjson.loads(an_order().model_dump_json())
            response = await client.post("/orders", json=body)
        assert response.status_code == 200, response.text
        receipt = await app.AsyncResult(response.json()["task_id"]).get(timeout=10)
        typed = await tasks["total"].send(Order.model_validate(body))
        assert (await typed.get(timeout=10)).total == Decimal("2.80")
    assert receipt["total"] == "2.80"  # a bare id knows no task: the JSON form


async def test_process_tasks_get_their_arguments_rebuilt_in_the_child(make_app: AppFactory) -> None:
    import process_tasks

    app = make_app()
    app.import_path = "process_tasks:app"
    days = app.task(executor="process")(process_tasks.days_between)
    async with app, running_worker(app, processes=1):
        result = await days.send(dt.date(2026, 11, 29), [Decimal("0.5"), Decimal("0.25")])
        assert await result.get(timeout=20) == Decimal("2.75")


# -- the plan ------------------------------------------------------------------------------


UserId = NewType("UserId", int)


@pytest.mark.parametrize(
    "hint",
    [int, str, float, bool, None, Any, object, list[int], dict[str, list[str]], int | None,
     list[dict[str, Any]], UserId, Annotated[int, "meta"]],
)  # fmt: skip
def test_plain_json_hints_need_no_plan(hint: Any) -> None:
    assert plan(hint) is None


def test_plain_tasks_cost_nothing_per_call() -> None:
    app = App("typed-plan", broker="memory://")
    tasks = register_typed(app)
    assert tasks["plain"].arguments is None and tasks["plain"].result_type is None
    assert tasks["total"].arguments is not None and tasks["total"].result_type is not None

    @app.task(name="typed.untyped")
    async def untyped(a, b=1, *rest, **more):  # type: ignore[no-untyped-def]
        return a

    assert untyped.arguments is None and untyped.result_type is None


def test_one_unresolvable_hint_does_not_drop_the_others() -> None:
    app = App("typed-partial", broker="memory://")

    class Local:  # local to this function: its string annotation cannot be resolved
        pass

    @app.task(name="typed.partial")
    async def partial(when: dt.datetime, thing: Local) -> None:
        return None

    assert partial.arguments is not None
    args, _ = partial.arguments.apply(("2026-12-01T00:00:00+00:00", {"a": 1}), {})
    assert args == (dt.datetime(2026, 12, 1, tzinfo=dt.UTC), {"a": 1})


def test_scalar_plans_check_their_input() -> None:
    assert plan(Decimal)("1.10") == Decimal("1.10")
    assert plan(bytes)(base64.b64encode(b"\x01").decode()) == b"\x01"
    assert plan(dt.timedelta)(1.5) == dt.timedelta(seconds=1.5)
    with pytest.raises(ValueError, match="base64"):
        plan(bytes)("not base64!")
    with pytest.raises(TypeError, match="decimal"):
        plan(Decimal)(True)
    with pytest.raises(ValueError, match="no field"):
        plan(Point)({"x": 1, "y": 2, "z": 3})


# -- serializers ---------------------------------------------------------------------------


async def test_msgpack_carries_the_same_types(make_app: AppFactory) -> None:
    app = make_app(serializer="msgpack", accept_content=["json", "msgpack"])
    tasks = register_typed(app)
    order = an_order()
    async with app, running_worker(app):
        receipt = await (await tasks["total"].send(order)).get(timeout=10)
        parent = Shape("root", [], Color.RED, dt.date(2026, 1, 1))
        sent = Shape("s", [Point(1, 1)], Color.RED, dt.date(2026, 12, 1), parent=parent)
        at = dt.datetime(2026, 12, 1, 1, 2, tzinfo=dt.UTC)
        shaped = await (await tasks["shape"].send(sent, at, uuid.uuid4(), b"\x00\xff\x10")).get(
            timeout=10
        )
    assert receipt.total == Decimal("2.80")
    assert shaped.blob == b"\x00\xff\x10" and shaped.points[-1] == Point(1, 2)


class Rot13Json:
    """A serializer of one's own: JSON with its bytes reversed (to see it really ran)."""

    name = "reversed-json"

    def dumps(self, obj: Any) -> bytes:
        return get_serializer("json").dumps(obj)[::-1]

    def loads(self, data: bytes) -> Any:
        return get_serializer("json").loads(data[::-1])


async def test_register_a_serializer() -> None:
    register_serializer(Rot13Json())
    app = App(
        "typed-custom", broker="memory://", serializer="reversed-json",
        accept_content=["reversed-json"],
    )  # fmt: skip
    tasks = register_typed(app)
    async with app, running_worker(app):
        assert await (await tasks["plain"].send(1, ["a"])).get(timeout=10) == [1, 1]
    body = app.codec.encode(app.codec.decode(app.codec.encode(_message(app))))
    assert orjson.loads(body)["ct"] == "reversed-json"


def _message(app: App) -> Any:
    from aioqueue import Message

    return Message(id="m1", task="typed.plain", queue="default", args=(1, ["a"]), kwargs={})


def test_serializer_registry_errors() -> None:
    class Nameless:
        name = ""

        def dumps(self, obj: Any) -> bytes:
            return b""

        def loads(self, data: bytes) -> Any:
            return None

    with pytest.raises(ConfigurationError, match="name"):
        register_serializer(Nameless())
    json_again = Rot13Json()
    json_again.name = "json"
    with pytest.raises(ConfigurationError, match="other than 'json'"):
        register_serializer(json_again)
    with pytest.raises(ConfigurationError, match=r"msgpack.*register_serializer"):
        get_serializer("nope")


# -- mypy and runtime agree ----------------------------------------------------------------


def test_what_type_checks_in_send_encodes(tmp_path: Path) -> None:
    from mypy import api

    snippet = tmp_path / "typed_send.py"
    snippet.write_text(
        textwrap.dedent(
            """
            import datetime as dt
            import uuid
            from dataclasses import dataclass
            from decimal import Decimal

            from pydantic import BaseModel

            from aioqueue import App, AsyncResult, SyncResult

            app = App("typed")

            class Item(BaseModel):
                price: Decimal

            @dataclass
            class Box:
                at: dt.datetime
                raw: bytes

            @app.task
            async def ship(item: Item, box: Box, key: uuid.UUID) -> Item:
                return item

            async def use() -> None:
                box = Box(dt.datetime.now(dt.UTC), b"x")
                item = Item(price=Decimal(1))
                result: AsyncResult[Item] = await ship.send(item, box, uuid.uuid4())
                back: Item = await result.get()
                await ship.send({"price": 1}, box, uuid.uuid4())

            def from_sync() -> None:
                box = Box(dt.datetime.now(dt.UTC), b"")
                handle: SyncResult[Item] = ship.send_sync(Item(price=Decimal(1)), box, uuid.uuid4())
            """
        )
    )
    out, _, _ = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1, out  # the dict is not an Item
    assert 'Argument 1 to "send" of "Task" has incompatible type "dict' in errors[0], out

"""Models, dataclasses, datetimes, Decimal, UUID and bytes as task arguments and results:
`python examples/typed_data.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set. The task's hints say what the worker rebuilds
from JSON; its return annotation says what `result.get()` rebuilds. Needs pydantic
(`pip install 'aioqueue[pydantic]'`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from dataclasses import dataclass
from decimal import Decimal

from pydantic import BaseModel

from aioqueue import App

app = App(
    "typed-demo",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue"),
)


class Line(BaseModel):
    sku: str
    price: Decimal
    count: int = 1


class Order(BaseModel):  # what a FastAPI handler receives, sent as it is
    id: uuid.UUID
    placed: dt.datetime
    lines: list[Line]


@dataclass
class Invoice:
    order: uuid.UUID
    total: Decimal
    due: dt.date
    pdf: bytes


@app.task
async def invoice(order: Order, terms: dt.timedelta = dt.timedelta(days=30)) -> Invoice:
    total = sum((line.price * line.count for line in order.lines), Decimal(0))
    due = (order.placed + terms).date()
    return Invoice(order.id, total, due, pdf=b"%PDF-1.7 ...")


async def main() -> None:
    order = Order(
        id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        placed=dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC),
        lines=[Line(sku="apple", price=Decimal("0.40"), count=5), Line(sku="pear", price="1.10")],
    )
    async with app, app.worker(concurrency=5):
        result = await invoice.send(order, terms=dt.timedelta(days=14))
        back = await result.get(timeout=10)
    print(f"{type(back).__name__}: total {back.total!r}, due {back.due!r}, pdf {back.pdf[:8]!r}")


if __name__ == "__main__":
    asyncio.run(main())

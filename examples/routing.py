"""Routes and priorities: ``python examples/routing.py`` (memory:// unless AIOQUEUE_BROKER_URL).

Sends a few tasks before any worker runs, then drains both queues with one burst worker and
prints the order they ran in: the billing queue first (listed first), and within the default
queue the urgent report before the plain ones.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aioqueue import App


def by_customer(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    return "billing" if kwargs.get("customer") == "big" else None  # None: no opinion


app = App(
    "routing-demo",
    task_routes=[by_customer, {"billing.*": {"queue": "billing", "priority": 5}}],
)
ran: list[str] = []


@app.task(name="billing.charge")
async def charge(customer: str) -> None:
    ran.append(f"charge {customer}")


@app.task(name="report.build")
async def build(day: str) -> None:
    ran.append(f"report {day}")


async def main() -> None:
    async with app:
        await build.send("mon")
        await build.send("tue")
        await build.options(priority=9).send("urgent")  # sent last, runs first of its queue
        await charge.send(customer="small")  # routed by the glob
        await app.send_task("report.build", kwargs={"day": "by-name"})
        await app.worker(queues=["billing", "default"], concurrency=1, burst=True).run()
    for line in ran:
        print(line)


if __name__ == "__main__":
    asyncio.run(main())

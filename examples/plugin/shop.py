"""A small app for the pytest plugin sample (test_shop.py); its broker is never reached there.

Run the sample: `pytest -p aioqueue.testing --aioqueue-app shop:app examples/plugin`.
"""

from __future__ import annotations

from aioqueue import App

app = App("shop", broker="redis://127.0.0.1:6379/0")  # tests run it on memory:// instead
inventory: dict[str, int] = {}
payment_attempts: list[str] = []


@app.task(name="shop.reserve")
async def reserve(sku: str, count: int) -> int:
    inventory[sku] = inventory.get(sku, 0) + count
    return inventory[sku]


@app.task(name="shop.charge", retry_for=(ConnectionError,), retry_backoff=30, max_retries=5)
async def charge(order: str) -> str:
    """Fails twice (the payment gateway is down), then succeeds: two retries with backoff."""
    payment_attempts.append(order)
    if len(payment_attempts) < 3:
        raise ConnectionError("payment gateway unreachable")
    return f"charged {order}"


@app.task(name="shop.checkout")
async def checkout(order: str, sku: str) -> str:
    await reserve.send(sku, 1)
    await charge.send(order)
    return order


@app.periodic(every=600, name="restock")
@app.task(name="shop.restock")
async def restock() -> None:
    for sku in inventory:
        inventory[sku] += 10

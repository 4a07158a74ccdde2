"""The worker's side. ``executor="thread"``: the Django ORM is synchronous, so the task runs on
the worker's thread pool, never on its event loop."""

from django.db import close_old_connections
from shop.taskqueue import app

from orders.models import Order


@app.task(executor="thread")
def confirm(order_id: int) -> str:
    """Reads the order the view committed (sent before the commit, this could raise
    Order.DoesNotExist) and marks it confirmed."""
    close_old_connections()
    try:
        order = Order.objects.get(id=order_id)
        order.status = "confirmed"
        order.save(update_fields=["status"])
        return order.status
    finally:
        close_old_connections()

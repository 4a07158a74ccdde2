"""Run by Django's test runner: ``python manage.py test orders``. TransactionTestCase, because
TestCase wraps each test in a transaction that never commits (so on_commit would never fire).
The broker comes from AIOQUEUE_BROKER_URL (and AIOQUEUE_KEY_PREFIX); no worker runs here."""

from django.test import TransactionTestCase
from shop.taskqueue import app

from aioqueue.sync import run_sync
from orders.models import Order


def queued() -> int:
    return run_sync(app, "queue_length", app.broker.queue_length, app.conf.default_queue)


class SendOnCommitTests(TransactionTestCase):
    def setUp(self) -> None:
        self.before = queued()

    def test_a_committed_order_sends_its_confirmation_once(self) -> None:
        response = self.client.post("/orders/", {"item": "book"})
        self.assertEqual(response.status_code, 201)
        self.assertTrue(Order.objects.filter(id=response.json()["order_id"]).exists())
        self.assertEqual(queued(), self.before + 1)

    def test_a_rolled_back_order_sends_nothing(self) -> None:
        response = self.client.post("/orders/?fail=1", {"item": "book"})
        self.assertEqual(response.status_code, 402)
        self.assertFalse(Order.objects.exists())
        self.assertEqual(queued(), self.before)

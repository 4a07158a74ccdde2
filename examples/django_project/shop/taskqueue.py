"""The shop's aioqueue App. The broker and backend come from AIOQUEUE_BROKER_URL and
AIOQUEUE_RESULT_BACKEND when set, as for any app."""

from aioqueue import App

app = App("shop", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/0")

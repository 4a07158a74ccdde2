"""Runs ``aioqueue worker ...`` unchanged, on uvloop.

aioqueue's CLI calls ``asyncio.run`` and imports the app inside the loop, so a policy set in the
task module comes too late; every other asyncio contestant here runs its worker on uvloop.
``BENCH_AQ_UVLOOP=0`` runs the plain CLI.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    if os.environ.get("BENCH_AQ_UVLOOP", "1") == "1":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from aioqueue.cli import main

    sys.exit(main(sys.argv[1:]))

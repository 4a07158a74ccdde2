"""memory:// keeps only what is live: results, states and claims nobody reads still expire."""

from __future__ import annotations

from conftest import wait_until

from aioqueue.backends._expiring import Expiring
from aioqueue.backends.memory import MemoryBackend


def test_a_write_drops_every_entry_whose_time_is_up() -> None:
    table: Expiring[int] = Expiring()
    for n in range(100):
        table.put(f"old-{n}", n, -1.0)  # already due
    table.put("kept", 1, 60.0)
    table.put("again", 2, 60.0)
    assert len(table) == 2 and table.get("kept") == 1 and table.get("old-3") is None


def test_a_later_put_outlives_the_first_ones_time() -> None:
    table: Expiring[str] = Expiring()
    table.put("id", "first", -1.0)
    table.put("id", "second", 60.0)  # the stale heap entry of "first" must not drop it
    table.put("other", "x", 60.0)
    assert table.get("id") == "second"


async def test_results_states_and_claims_nobody_reads_do_not_pile_up() -> None:
    backend = MemoryBackend()
    for n in range(50):
        await backend.store(f"t{n}", b"{}", ttl=0.05, reply_to=None)
        await backend.store_state(f"s{n}", b"{}", ttl=0.05)
        assert await backend.claim(f"c{n}", 0.05, fresh=False)

    probes = iter(range(1_000_000))

    async def only_the_probes_left() -> bool:
        # the backend's own tables (nothing public counts them); each write sweeps
        n = next(probes)
        await backend.store("probe", b"{}", ttl=60, reply_to=None)
        await backend.store_state("probe-state", b"{}", ttl=60)
        await backend.end_claim(f"probe-{n - 1}", 0)
        assert await backend.claim(f"probe-{n}", 60, fresh=False)
        return (len(backend._final), len(backend._states), len(backend._claims)) == (1, 1, 1)

    await wait_until(only_the_probes_left, timeout=5)

"""The source budget: downloads start while the sources held fit, large ones a few at a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from imgsvc.memory import SourceBudget

MIB = 1024 * 1024


class Holder:
    """One download's hold on the budget, kept open until ``done`` is set."""

    def __init__(self, budget: SourceBudget, size: int) -> None:
        self.entered = asyncio.Event()
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run(budget, size))

    async def _run(self, budget: SourceBudget, size: int) -> None:
        async with budget.hold() as settle:
            self.entered.set()
            settle(size)
            await self.done.wait()


async def settle_down() -> None:
    """Let the ready tasks run until each blocks: a few turns of the loop, no time passing,
    so that what has not started by then is held back, not late."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_large_sources_start_a_few_at_a_time_and_small_ones_many() -> None:
    budget = SourceBudget(16 * MIB, min_sources=3, first_guess=4 * MIB)
    large = [Holder(budget, 5 * MIB) for _ in range(8)]
    await settle_down()
    started = [h for h in large if h.entered.is_set()]
    # 3 always may; after them 15 MiB are held and a fourth (expected 5) would not fit.
    assert len(started) == 3 and budget.held == 15 * MIB
    started[0].done.set()
    await settle_down()
    assert sum(h.entered.is_set() for h in large) == 4 and budget.held == 15 * MIB
    for h in large:
        h.done.set()
    await asyncio.gather(*(h.task for h in large))
    assert budget.held == 0 and budget.sources == 0

    small = [Holder(budget, MIB // 2) for _ in range(40)]
    await settle_down()
    # The expected size has followed the sources seen, so many small ones fit.
    assert sum(h.entered.is_set() for h in small) >= 16
    for h in small:
        h.done.set()
    await asyncio.gather(*(h.task for h in small))
    assert budget.held == 0


async def test_a_source_larger_than_the_budget_still_gets_through() -> None:
    budget = SourceBudget(4 * MIB, min_sources=1)
    huge = Holder(budget, 40 * MIB)
    await settle_down()
    assert huge.entered.is_set() and budget.held == 40 * MIB
    other = Holder(budget, MIB)
    await settle_down()
    assert not other.entered.is_set()
    huge.done.set()
    await asyncio.wait_for(other.entered.wait(), 1)
    other.done.set()
    await asyncio.gather(huge.task, other.task)


async def test_a_failed_or_cancelled_download_gives_its_share_back() -> None:
    budget = SourceBudget(8 * MIB, min_sources=1, first_guess=8 * MIB)

    @contextlib.asynccontextmanager
    async def failing() -> AsyncIterator[Callable[[int], None]]:
        async with budget.hold() as settle:
            yield settle
            raise ConnectionError("the source went away")

    with contextlib.suppress(ConnectionError):
        async with failing():
            pass
    assert budget.held == 0 and budget.sources == 0

    first = Holder(budget, 8 * MIB)
    waiting = Holder(budget, MIB)
    await settle_down()
    assert first.entered.is_set() and not waiting.entered.is_set()
    waiting.task.cancel()
    await asyncio.gather(waiting.task, return_exceptions=True)
    first.done.set()
    await first.task
    assert budget.held == 0 and budget.sources == 0


async def test_no_limit_means_only_the_slots_bound_the_sources() -> None:
    budget = SourceBudget(0, min_sources=1)
    holders = [Holder(budget, 30 * MIB) for _ in range(10)]
    await settle_down()
    assert all(h.entered.is_set() for h in holders)
    for h in holders:
        h.done.set()
    await asyncio.gather(*(h.task for h in holders))


class DeclaringHolder:
    """A download that declares its size once ``headers`` is set (its answer has come),
    then reads its body."""

    def __init__(self, budget: SourceBudget, size: int, headers: asyncio.Event | None = None) -> None:
        self.admitted = asyncio.Event()
        self.reading = asyncio.Event()
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run(budget, size, headers))

    async def _run(self, budget: SourceBudget, size: int, headers: asyncio.Event | None) -> None:
        async with budget.hold() as source:
            self.admitted.set()
            if headers is not None:
                await headers.wait()
            await source.expect(size)
            self.reading.set()
            source(size)
            await self.done.wait()


async def test_a_burst_of_large_sources_after_small_ones_waits_at_its_headers() -> None:
    budget = SourceBudget(16 * MIB, min_sources=2, first_guess=MIB // 2)
    headers = asyncio.Event()
    burst = [DeclaringHolder(budget, 8 * MIB, headers) for _ in range(8)]
    await settle_down()
    # Small sources so far: all eight start, each expected at half a MiB...
    assert all(h.admitted.is_set() for h in burst)
    headers.set()  # ...and then each answers with 8 MiB to come:
    await settle_down()
    # only two (16 MiB) read their bodies; the others wait at their headers.
    reading = [h for h in burst if h.reading.is_set()]
    assert len(reading) == 2
    for _ in range(6):
        reading[0].done.set()
        await reading[0].task
        await settle_down()
        reading = [h for h in burst if h.reading.is_set() and not h.done.is_set()]
        assert len(reading) == 2
    for h in burst:
        h.done.set()
    await asyncio.gather(*(h.task for h in burst))
    assert budget.held == 0 and budget.known == 0 and budget.sources == 0
    # Never more than the two bodies and the waiting ones' small expected shares.
    assert budget.peak <= 16 * MIB + 6 * (MIB // 2)


async def test_a_declared_source_larger_than_the_budget_still_gets_through() -> None:
    budget = SourceBudget(4 * MIB, min_sources=1, first_guess=MIB)
    huge = DeclaringHolder(budget, 40 * MIB)
    await settle_down()
    assert huge.reading.is_set()  # none other of known size is held
    huge.done.set()
    await huge.task
    assert budget.held == 0 and budget.known == 0

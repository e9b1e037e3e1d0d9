"""The event-loop lag metric: what holds a process's loop shows up in it."""

from __future__ import annotations

import asyncio
import time

from imgsvc import metrics, resources


def _observations_over(seconds: float) -> float:
    buckets = {
        sample.labels["le"]: sample.value
        for family in metrics.event_loop_lag.collect()
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    return buckets["+Inf"] - buckets[str(seconds)]


async def test_a_held_event_loop_shows_in_the_lag_metric(res: resources.Resources) -> None:
    await asyncio.sleep(2 * metrics.LAG_INTERVAL)  # the watcher that opened() started is waiting
    before = _observations_over(0.1)
    time.sleep(0.3)  # holds the loop, as blocking work in a handler would
    await asyncio.sleep(2 * metrics.LAG_INTERVAL)
    assert _observations_over(0.1) >= before + 1  # late by 0.2-0.3 s

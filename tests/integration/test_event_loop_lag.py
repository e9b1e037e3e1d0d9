"""The event-loop lag metric: what holds a process's loop shows up in it."""

from __future__ import annotations

import time

from imgsvc import metrics, resources
from tests.conftest import eventually


def _observations_over(seconds: float) -> float:
    buckets = {
        sample.labels["le"]: sample.value
        for family in metrics.event_loop_lag.collect()
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    return buckets["+Inf"] - buckets[str(seconds)]


def _observations() -> float:
    return next(
        sample.value
        for family in metrics.event_loop_lag.collect()
        for sample in family.samples
        if sample.name.endswith("_count")
    )


async def test_a_held_event_loop_shows_in_the_lag_metric(res: resources.Resources) -> None:
    # The watcher that opened() started has observed once, so it is waiting on its timer.
    started = _observations()
    await eventually(lambda: _observations() > started, what="the lag watcher observed the loop")
    before = _observations_over(0.1)
    time.sleep(0.3)  # holds the loop, as blocking work in a handler would
    await eventually(
        lambda: _observations_over(0.1) >= before + 1,  # late by 0.2-0.3 s
        timeout=10 * metrics.LAG_INTERVAL,
        what="the held loop showed in the lag metric as over 0.1 s late",
    )

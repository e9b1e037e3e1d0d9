"""Talking to the API as a client does: upload a CSV, wait for the request to finish,
and an open-loop load generator for latency.

Open loop: request k is due at ``start + k / rate`` whether or not earlier ones have
answered, and its latency is measured from that due time, so a slow server shows
as queueing delay instead of quietly lowering the offered load.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime
import io
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

FINAL = frozenset({"completed", "completed_with_errors", "failed"})
END_POLL = 0.05  # seconds between status polls near a request's end


def csv_body(rows: Sequence[tuple[int, str, str]]) -> bytes:
    """A CSV in the service's format: one product a row, one image URL each."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for serial, name, url in rows:
        writer.writerow([serial, name, url])
    return out.getvalue().encode()


def _epoch(value: str | None) -> float | None:
    return datetime.datetime.fromisoformat(value).timestamp() if value else None


def csv_form(body: bytes, name: str, *, reprocess: bool = False) -> aiohttp.FormData:
    """The multipart form POST /upload takes: the CSV in the field ``file``; with
    ``reprocess``, every image is compressed again (no stored result reused)."""
    form = aiohttp.FormData()
    form.add_field("file", body, filename=name, content_type="text/csv")
    if reprocess:
        form.add_field("reprocess", "true")
    return form


async def upload(
    session: aiohttp.ClientSession, base: str, body: bytes, name: str, *, reprocess: bool = False
) -> dict[str, Any]:
    """POST /upload; return the 202 answer, or raise RuntimeError with the server's words."""
    async with session.post(base + "/upload", data=csv_form(body, name, reprocess=reprocess)) as response:
        answer: dict[str, Any] = await response.json(content_type=None)
        if response.status != 202:
            raise RuntimeError(f"POST /upload answered {response.status}: {answer}")
    return answer


@dataclasses.dataclass
class Batch:
    """One request, from the upload to its final status, in epoch seconds."""

    request_id: str
    images: int
    upload_started: float
    upload_answered: float
    status: str = ""
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    created_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    observed_final: float | None = None
    csv_written: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    reuse: dict[str, Any] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Upload sent to final status (the server's completed_at, so no polling error)."""
        end = self.completed_at if self.completed_at is not None else self.observed_final
        assert end is not None
        return end - self.upload_started

    def as_json(self) -> dict[str, Any]:
        """Everything, for the JSON report."""
        return dataclasses.asdict(self) | {"seconds": self.seconds}


async def get_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """GET a status URL; raise RuntimeError on anything but 200."""
    async with session.get(url) as response:
        body: dict[str, Any] = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"GET {url} answered {response.status}: {body}")
    return body


async def run_batch(
    session: aiohttp.ClientSession,
    base: str,
    rows: Sequence[tuple[int, str, str]],
    *,
    time_limit: float,
    poll_interval: float = 0.5,
    on_uploaded: Callable[[str], None] | None = None,
    reprocess: bool = True,
) -> Batch:
    """Upload ``rows``, poll (one product a page) until the request is final and its
    output CSV written; raise TimeoutError after ``time_limit`` seconds.

    Twice a second, so that the harness adds little load (the timing uses the server's
    completed_at), until the images left should finish before the next poll: then every
    END_POLL seconds, so that the CPU windows the caller closes on return end close to
    the request's end rather than up to a poll interval after it.

    ``reprocess`` (the default: the phases that measure the pipeline send the same
    images again and again) makes the service compress every image again; the re-run
    phase sends without it, to measure reuse."""
    body = csv_body(rows)
    started = time.time()
    answer = await upload(session, base, body, "bench.csv", reprocess=reprocess)
    batch = Batch(
        request_id=answer["request_id"],
        images=answer["images"],
        upload_started=started,
        upload_answered=time.time(),
    )
    if on_uploaded is not None:
        on_uploaded(batch.request_id)
    status_url = f"{base}/status/{batch.request_id}"
    deadline = time.monotonic() + time_limit
    first: tuple[float, int] | None = None  # (when, images finished) at the first poll
    while True:
        status = await get_status(session, status_url + "?per_page=1")
        now = time.monotonic()
        if status["status"] in FINAL and batch.observed_final is None:
            batch.observed_final = time.time()
        if batch.observed_final is not None and status["output_csv_url"]:
            batch.csv_written = time.time()
            break
        if now > deadline:
            raise TimeoutError(
                f"request {batch.request_id} was not finished after {time_limit:g} s: {status['counts']}"
            )
        counts = status["counts"]
        finished = counts["done"] + counts["failed"] + counts.get("cancelled", 0)
        first = first or (now, finished)
        rate = (finished - first[1]) / (now - first[0]) if now > first[0] else 0.0
        left = counts["total"] - finished
        near_end = batch.observed_final is not None or left <= 2 * rate * poll_interval
        await asyncio.sleep(END_POLL if near_end else poll_interval)
    batch.status = status["status"]
    batch.counts = status["counts"]
    batch.created_at = _epoch(status["created_at"])
    batch.started_at = _epoch(status["started_at"])
    batch.completed_at = _epoch(status["completed_at"])
    batch.bytes_in = status["bytes_in"]
    batch.bytes_out = status["bytes_out"]
    batch.reuse = status["reuse"]
    if status["counts"]["failed"]:
        full = await get_status(session, status_url + "?per_page=500")
        batch.errors = [
            f"{image['input_url']}: {image['error']}"
            for product in full["products"]
            for image in product["images"]
            if image["status"] == "failed"
        ][:10]
    return batch


# -- open-loop latency ---------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclasses.dataclass
class Latencies:
    """What one open-loop stream measured."""

    name: str
    rate: float
    sent: int = 0
    ok: int = 0
    failed: int = 0
    seconds: list[float] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    unfinished: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts and percentiles, in milliseconds."""
        values = sorted(self.seconds)

        def ms(p: float) -> float | None:
            value = percentile(values, p)
            return round(value * 1000, 1) if value is not None else None

        return {
            "name": self.name,
            "rate_per_s": self.rate,
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "unfinished": self.unfinished,
            "p50_ms": ms(50),
            "p90_ms": ms(90),
            "p99_ms": ms(99),
            "max_ms": round(values[-1] * 1000, 1) if values else None,
            "failures": self.failures[:5],
        }


async def open_loop(
    name: str,
    rate: float,
    call: Callable[[int], Awaitable[int]],
    stop: asyncio.Event,
    *,
    drain_seconds: float = 30.0,
) -> Latencies:
    """Call ``call(k)`` at ``rate`` per second on a fixed timetable until ``stop`` is set;
    wait up to ``drain_seconds`` for the calls in flight. ``call`` returns the HTTP status."""
    result = Latencies(name=name, rate=rate)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one(k: int, due: float) -> None:
        try:
            status = await call(k)
        except Exception as exc:
            result.failed += 1
            result.failures.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        elapsed = loop.time() - due
        if 200 <= status < 300:
            result.ok += 1
            result.seconds.append(elapsed)
        else:
            result.failed += 1
            result.failures.append(f"HTTP {status}")

    if rate <= 0:
        return result
    start = loop.time()
    k = 0
    while not stop.is_set():
        due = start + k / rate
        wait = due - loop.time()
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), wait)
                break
            except TimeoutError:
                pass
        task = asyncio.create_task(one(k, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        result.sent += 1
        k += 1
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_seconds)
        for task in pending:
            task.cancel()
        result.unfinished = len(pending)
    return result


async def loop_lag(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The API's ``imgsvc_event_loop_lag_seconds`` histogram now: cumulative count by
    upper bound (``le``), from its /metrics."""
    async with session.get(base + "/metrics") as response:
        text = await response.text()
    return {
        sample.labels["le"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "imgsvc_event_loop_lag_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }


def lag_summary(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """What the loop-lag histogram gained between two reads: how many timers fired, how
    many were over 50 ms late, and the upper bound of the bucket of the most late."""
    gained = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    timers = gained.get("+Inf", 0.0)
    latest = next((le for le in sorted(gained, key=float) if gained[le] >= timers), None) if timers else None
    return {"timers": int(timers), "over_50ms": int(timers - gained.get("0.05", 0.0)), "max_lag_le_s": latest}

"""Large uploads: POST /upload of big CSVs, timed, with the API's memory watched.

The targets, on a 2-core machine: a 10,000-row CSV answers 202 in under
500 ms at the median, and a 50 MB CSV grows the API's RSS by less than 20 MB. The
phase runs last, with the worker stopped first, so the tens of thousands of images
these CSVs queue are never processed and disturb nothing; the API and PostgreSQL
keep running. Each upload is timed from the moment it is sent to the end of the
202 answer. The API's VmRSS is sampled every 20 ms, and its VmHWM (the kernel's
exact peak) is reset just before the large CSV and read after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from bench import load, procstat
from bench.services import STOP_SECONDS, Services

MIB = 1024 * 1024
TARGET_P50_MS = 500.0  # POST /upload of a 10,000-row CSV, median
TARGET_RSS_GROWTH_MIB = 20.0  # the API's RSS growth for a 50 MB CSV
ENVELOPE_MARGIN = 100 * 1024  # left under IMGSVC_MAX_CSV_BYTES for the multipart envelope
# The service's default limits (IMGSVC_MAX_ROWS, _MAX_IMAGES, _MAX_URLS_PER_ROW, _MAX_URL_LENGTH).
MAX_ROWS = 100_000
MAX_IMAGES = 500_000
MAX_URLS_PER_ROW = 100
MAX_URL_LENGTH = 2048
URLS_PER_ROW_SMALL = 2  # in the 10,000-row CSV
UPLOAD_TIMEOUT = 300.0  # seconds one upload may take; the 50 MB one takes several
RSS_INTERVAL = 0.02
ERROR_CHARS = 300


@dataclasses.dataclass
class Csv:
    """A generated CSV and what it holds."""

    body: bytes
    rows: int
    urls: int
    longest_url: int

    def as_json(self) -> dict[str, Any]:
        """Its shape, not its bytes."""
        return {
            "bytes": len(self.body),
            "mib": round(len(self.body) / MIB, 2),
            "rows": self.rows,
            "urls": self.urls,
            "urls_per_row": round(self.urls / self.rows, 2) if self.rows else 0,
            "longest_url": self.longest_url,
        }


def _build(
    image_url: Callable[[int, str], str], names: Sequence[str], rows: int, urls_per_row: int, pad: int = 0
) -> Csv:
    """``rows`` products of ``urls_per_row`` URLs each (a quoted cell, comma-separated), every
    URL unique; with ``pad``, every URL ends with "?" and ``pad`` x's."""
    tail = "?" + "x" * pad if pad else ""
    table: list[tuple[int, str, str]] = []
    longest = 0
    for row in range(rows):
        urls = []
        for j in range(urls_per_row):
            index = row * urls_per_row + j
            url = image_url(index + 1, names[index % len(names)]) + tail
            longest = max(longest, len(url))
            urls.append(url)
        table.append((row + 1, f"Bench product {row + 1}", ",".join(urls)))
    return Csv(load.csv_body(table), rows, rows * urls_per_row, longest)


def rows_csv(image_url: Callable[[int, str], str], names: Sequence[str], rows: int) -> Csv:
    """The 10,000-row kind: ``rows`` products, two image URLs each."""
    return _build(image_url, names, rows, URLS_PER_ROW_SMALL)


def sized_csv(image_url: Callable[[int, str], str], names: Sequence[str], target: int) -> Csv:
    """A CSV of at most ``target`` bytes, within one byte a URL of it where the service's
    default limits allow: up to 100,000 rows of 5 URLs (500,000 in all), the URLs padded
    with a query string (at most 2,048 characters each) to make up the size."""
    urls_per_row = min(MAX_URLS_PER_ROW, MAX_IMAGES // MAX_ROWS)
    rows = MAX_ROWS
    base = _build(image_url, names, rows, urls_per_row)
    while len(base.body) > target and rows > 1:  # a small target: fewer rows
        rows = max(1, rows * target // len(base.body))
        base = _build(image_url, names, rows, urls_per_row)
    pad = min((target - len(base.body)) // base.urls - 1, MAX_URL_LENGTH - base.longest_url - 1)
    return _build(image_url, names, rows, urls_per_row, pad) if pad > 0 else base


@dataclasses.dataclass
class Answer:
    """One POST /upload: its status (None when there was no answer) and how long it took."""

    status: int | None
    seconds: float
    request_id: str | None = None
    images: int | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Everything, seconds rounded."""
        return dataclasses.asdict(self) | {"seconds": round(self.seconds, 4)}


async def post(session: aiohttp.ClientSession, base: str, body: bytes, name: str) -> Answer:
    """POST /upload (multipart, field ``file``), timed from the send to the end of the answer;
    a non-202 answer or a failure is returned with its first 300 characters, not raised."""
    form = load.csv_form(body, name)
    started = time.perf_counter()
    try:
        async with session.post(base + "/upload", data=form) as response:
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Answer(None, time.perf_counter() - started, error=error[:ERROR_CHARS])
    seconds = time.perf_counter() - started
    text = raw.decode("utf-8", errors="replace")
    if status != 202:
        return Answer(status, seconds, error=text[:ERROR_CHARS])
    try:
        answer = json.loads(text)
    except ValueError:
        return Answer(status, seconds, error=f"not JSON: {text[:ERROR_CHARS]}")
    return Answer(status, seconds, request_id=answer.get("request_id"), images=answer.get("images"))


def _ms(value: float | None) -> float | None:
    return round(value * 1000, 1) if value is not None else None


@dataclasses.dataclass
class RepeatedUpload:
    """The same CSV uploaded several times, one after the other."""

    csv: Csv
    answers: list[Answer]
    api_rss_before_kib: int | None
    api_rss_peak_kib: int | None
    machine: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """Percentiles of the 202 answers, in milliseconds, and every answer."""
        values = sorted(a.seconds for a in self.answers if a.status == 202)
        p50 = load.percentile(values, 50)
        return {
            "csv": self.csv.as_json(),
            "uploads": len(self.answers),
            "accepted": len(values),
            "p50_ms": _ms(p50),
            "p90_ms": _ms(load.percentile(values, 90)),
            "min_ms": _ms(values[0] if values else None),
            "max_ms": _ms(values[-1] if values else None),
            "target_p50_ms": TARGET_P50_MS,
            "target_met": p50 is not None and p50 * 1000 < TARGET_P50_MS and len(values) == len(self.answers),
            "api_rss_before_kib": self.api_rss_before_kib,
            "api_rss_peak_kib": self.api_rss_peak_kib,
            "cpu_seconds": {k: round(v, 3) for k, v in self.machine["trees"].items()},
            "machine_cpu": {k: v for k, v in self.machine.items() if k != "trees"},
            "answers": [a.as_json() for a in self.answers],
        }


@dataclasses.dataclass
class LargeUpload:
    """One upload of a CSV near IMGSVC_MAX_CSV_BYTES, with the API's memory around it."""

    csv: Csv
    answer: Answer
    api_rss_before_kib: int | None
    api_rss_peak_kib: int | None  # sampled every 20 ms
    api_rss_after_kib: int | None
    api_vm_hwm_kib: int | None  # the kernel's peak since the reset before the upload; None if not reset
    machine: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """Figures for the report; growth = sampled peak minus the RSS before."""
        before = self.api_rss_before_kib
        growth = self.api_rss_peak_kib - before if before and self.api_rss_peak_kib else None
        hwm_growth = self.api_vm_hwm_kib - before if before and self.api_vm_hwm_kib else None
        return {
            "csv": self.csv.as_json(),
            "answer": self.answer.as_json(),
            "accepted": self.answer.status == 202,
            "seconds": round(self.answer.seconds, 3),
            "api_rss_before_kib": before,
            "api_rss_peak_kib": self.api_rss_peak_kib,
            "api_rss_after_kib": self.api_rss_after_kib,
            "api_rss_growth_kib": growth,
            "api_vm_hwm_kib": self.api_vm_hwm_kib,
            "api_vm_hwm_growth_kib": hwm_growth,
            "target_rss_growth_mib": TARGET_RSS_GROWTH_MIB,
            "target_met": growth is not None
            and growth / 1024 < TARGET_RSS_GROWTH_MIB
            and self.answer.status == 202,
            "cpu_seconds": {k: round(v, 3) for k, v in self.machine["trees"].items()},
            "machine_cpu": {k: v for k, v in self.machine.items() if k != "trees"},
        }


@dataclasses.dataclass
class LargeUploads:
    """The whole phase."""

    worker_exit_code: int | None
    worker_stop_seconds: float
    api_rss_at_start_kib: int | None
    repeated: RepeatedUpload | None
    large: LargeUpload | None

    def as_json(self) -> dict[str, Any]:
        """Figures for the report."""
        return {
            "worker_stopped": self.worker_exit_code is not None,
            "worker_exit_code": self.worker_exit_code,
            "worker_stop_seconds": round(self.worker_stop_seconds, 2),
            "api_rss_at_start_kib": self.api_rss_at_start_kib,
            "rows_upload": self.repeated.as_json() if self.repeated else None,
            "large_csv": self.large.as_json() if self.large else None,
            "rss_sample_interval_s": RSS_INTERVAL,
        }


async def run(
    services: Services, names: Sequence[str], *, rows: int, repeat: int, large_csv_mb: float
) -> LargeUploads:
    """Stop the worker, then upload a ``rows``-row CSV ``repeat`` times and one CSV of just
    under ``large_csv_mb`` MiB (none if 0), watching the API."""
    worker = services.child("worker")
    stopping = time.monotonic()
    exit_code = await asyncio.to_thread(worker.stop, STOP_SECONDS)
    stop_seconds = time.monotonic() - stopping
    if exit_code != 0:
        print(f"bench: the worker exited with {exit_code} when stopped", flush=True)
    api = services.child("api").popen.pid
    roots = {"api": api, "postgres": services.postmaster_pid()}
    sampler = procstat.RssSampler({"api": api}, interval=RSS_INTERVAL)
    start_rss = procstat.status_kib(api, "VmRSS")
    repeated: RepeatedUpload | None = None
    large: LargeUpload | None = None
    sampler.start()
    try:
        timeout = aiohttp.ClientTimeout(total=UPLOAD_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if rows and repeat:
                small = rows_csv(services.image_url, names, rows)
                print(
                    f"bench: large uploads, a {small.rows:,}-row CSV ({small.urls:,} URLs, "
                    f"{len(small.body) / MIB:.1f} MiB) {repeat} times",
                    flush=True,
                )
                before = procstat.status_kib(api, "VmRSS")
                sampler.window()
                meter = procstat.CpuMeter(roots)
                meter.start()
                answers: list[Answer] = []
                for _ in range(repeat):
                    answers.append(await post(session, services.api_base, small.body, "bench-rows.csv"))
                    if answers[-1].status != 202:
                        print(f"bench: the {rows:,}-row upload failed: {answers[-1].error}", flush=True)
                        break
                machine = meter.stop()
                peak = sampler.window().get("api")
                repeated = RepeatedUpload(small, answers, before, peak, machine)
            if large_csv_mb > 0:
                target = int(large_csv_mb * MIB) - ENVELOPE_MARGIN
                big = await asyncio.to_thread(sized_csv, services.image_url, names, target)
                print(
                    f"bench: large uploads, a {len(big.body) / MIB:.1f} MiB CSV ({big.rows:,} rows, "
                    f"{big.urls:,} URLs)",
                    flush=True,
                )
                await asyncio.sleep(0.5)  # let the API settle after the build
                before = procstat.status_kib(api, "VmRSS")
                sampler.window()
                reset = procstat.reset_peak_rss(api)
                meter = procstat.CpuMeter(roots)
                meter.start()
                answer = await post(session, services.api_base, big.body, "bench-large.csv")
                machine = meter.stop()
                peak = sampler.window().get("api")
                after = procstat.status_kib(api, "VmRSS")
                hwm = procstat.status_kib(api, "VmHWM") if reset else None
                if answer.status != 202:
                    print(
                        f"bench: the large upload answered {answer.status}: {answer.error}",
                        flush=True,
                    )
                large = LargeUpload(big, answer, before, peak, after, hwm, machine)
    finally:
        sampler.stop()
    return LargeUploads(exit_code, stop_seconds, start_rss, repeated, large)

"""The service under load: batches through POST /upload, measured from the outside.

Phases, in one run of the services:

1. warm-up: a few images, not measured (imports, connections, plan caches);
2. throughput: for each size class, one request with that class's images, sent
   ``repeat`` times one after the other (the median is reported), the harness polling
   lightly (one product a page, twice a second). Each batch is timed from the
   upload to the request's completed_at, with the CPU of every process tree and the
   peak RSS of the API and the worker; then, unless ``paired`` is None, one ceiling pass
   over the same images with every service stopped (SIGSTOP) meanwhile (the paired
   ratio);
3. latency: one request with the images (repeated, with new URLs, until it should
   last ``latency_seconds`` at the measured rate), while open-loop streams call
   GET /status/{id} (the full first page, as a client would) and POST /upload (a
   one-row CSV whose image answers 404, so it adds no codec work);
4. profile (optional): one more such request with py-spy sampling the worker; its
   timings are not used elsewhere, since sampling slows the worker;
5. large uploads (bench/uploads.py): the worker is stopped, then a 10,000-row CSV is
   uploaded several times (timed to the 202 answer) and one CSV of just under 50 MiB
   (the API's RSS sampled every 20 ms). The whole-run peaks and VmHWM above are read
   before this phase, so they describe the image work only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench import imageset, load, procstat, profiling, quiet, rerun, tiny, uploads
from bench.services import Services
from imgsvc import metrics

MAX_EXPANSION = 50  # at most this many copies of the image list in one request
CONTENDED = 0.1  # cores used by other processes above which a request is sent again
RETRIES = 3

Settle = Callable[[str], Awaitable[None]]  # waits until nothing runs before the phase named


@dataclasses.dataclass
class Options:
    """What the pipeline phases need from the command line."""

    warmup: int
    repeat: int
    status_rate: float
    upload_rate: float
    timeout: float
    latency: bool
    latency_seconds: float
    profile: bool
    profile_rate: int
    profile_seconds: float
    profile_output: Path
    large_uploads: bool
    upload_rows: int
    upload_repeat: int
    large_csv_mb: float
    rerun_images: int = 0  # the re-run phase's catalog; 0: no such phase
    tiny_images: int = 0  # the tiny-image phase's request; 0: no such phase
    pg_statements: bool = False  # report pg_stat_statements in the re-run and tiny phases
    # One ceiling pass over a request's sources, run right after the request; None: none.
    paired: Callable[[list[bytes]], dict[str, Any]] | None = None


@dataclasses.dataclass
class Measured:
    """One measured batch."""

    group: str
    items: list[imageset.Item]
    batch: load.Batch
    cpu_seconds: dict[str, float]
    peak_rss_kib: dict[str, int]
    machine: dict[str, Any]
    paired: dict[str, Any] | None = None

    @property
    def paired_ratio(self) -> float | None:
        """This request's rate over the ceiling pass right after it."""
        rate = self.paired and self.paired.get("images_per_s")
        return self.images_per_s / rate if rate else None

    @property
    def images_per_s(self) -> float:
        """Images a second, upload to final status."""
        return len(self.items) / self.batch.seconds

    def as_json(self) -> dict[str, Any]:
        """Figures for the report."""
        n = len(self.items)
        mp = imageset.megapixels(self.items)
        seconds = self.batch.seconds
        cpu_total = sum(self.cpu_seconds.values())
        return {
            "group": self.group,
            "images": n,
            "megapixels": round(mp, 3),
            "source_bytes": imageset.source_bytes(self.items),
            "status": self.batch.status,
            "counts": self.batch.counts,
            "seconds": round(seconds, 4),
            "images_per_s": round(n / seconds, 3),
            "megapixels_per_s": round(mp / seconds, 3),
            "cpu_seconds": {k: round(v, 3) for k, v in self.cpu_seconds.items()},
            "cpu_seconds_total": round(cpu_total, 3),
            "cpu_seconds_per_image": round(cpu_total / n, 4),
            "cpu_seconds_per_image_by_process": {k: round(v / n, 4) for k, v in self.cpu_seconds.items()},
            "peak_rss_kib": self.peak_rss_kib,
            "machine_cpu": {k: v for k, v in self.machine.items() if k != "trees"},
            "bytes_in": self.batch.bytes_in,
            "bytes_out": self.batch.bytes_out,
            "batch": self.batch.as_json(),
            "paired_ceiling": self.paired,
            "paired_ratio": round(self.paired_ratio, 4) if self.paired_ratio else None,
        }


@dataclasses.dataclass
class ClassRuns:
    """The repeated batches of one size class."""

    group: str
    runs: list[Measured]
    retried: int = 0

    @property
    def median(self) -> Measured:
        """The batch with the median throughput."""
        ordered = sorted(self.runs, key=lambda m: m.images_per_s)
        return ordered[(len(ordered) - 1) // 2]

    def as_json(self) -> dict[str, Any]:
        """The median batch's figures, the spread, and every batch."""
        rates = [m.images_per_s for m in self.runs]
        paired = sorted(r for r in (m.paired_ratio for m in self.runs) if r)
        return self.median.as_json() | {
            "paired_ratios": [round(r, 4) for r in paired],
            "paired_ratio_median": round(paired[(len(paired) - 1) // 2], 4) if paired else None,
            "repeats": len(self.runs),
            "retried_because_of_other_load": self.retried,
            "images_per_s_min": round(min(rates), 3),
            "images_per_s_max": round(max(rates), 3),
            "peak_rss_kib_all_repeats": {
                name: max(m.peak_rss_kib.get(name, 0) for m in self.runs)
                for name in self.runs[0].peak_rss_kib
            },
            "runs": [m.as_json() for m in self.runs],
        }


@dataclasses.dataclass
class PipelineResults:
    """Everything measured while the services ran."""

    throughput: list[ClassRuns]
    latency_batch: Measured | None
    latency: list[dict[str, Any]]
    api_loop_lag: dict[str, Any] | None  # the API's event-loop lag during the latency phase
    profile: dict[str, Any] | None
    peak_rss_kib: dict[str, int]
    vm_hwm_kib: dict[str, int | None]
    rss_samples: int
    pids: dict[str, int]
    large_uploads: uploads.LargeUploads | None = None  # in the JSON under a key of its own
    rerun: dict[str, Any] | None = None  # likewise
    tiny: dict[str, Any] | None = None  # likewise
    # Before each measured request: what an earlier one had left open, and the wait.
    quiet: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """Figures for the report."""
        return {
            "throughput": [c.as_json() for c in self.throughput],
            "latency_batch": self.latency_batch.as_json() if self.latency_batch else None,
            "latency": self.latency,
            "api_loop_lag": self.api_loop_lag,
            "profile": self.profile,
            "peak_rss_kib_whole_run": self.peak_rss_kib,
            "vm_hwm_kib": self.vm_hwm_kib,
            "rss_samples": self.rss_samples,
            "pids": self.pids,
            "quiet": self.quiet,
        }


def _rows(services: Services, items: Sequence[imageset.Item]) -> list[tuple[int, str, str]]:
    return [
        (item.index, f"Bench product {item.index}", services.image_url(item.index, item.file.name))
        for item in items
    ]


def expanded(items: Sequence[imageset.Item], seconds: float, images_per_s: float) -> list[imageset.Item]:
    """``items`` repeated (new indexes, so new URLs) to last about ``seconds`` at ``images_per_s``."""
    copies = max(1, min(MAX_EXPANSION, math.ceil(seconds * images_per_s / max(1, len(items)))))
    return [
        imageset.Item(index=copy * len(items) + i + 1, file=item.file)
        for copy in range(copies)
        for i, item in enumerate(items)
    ]


async def _measured_batch(
    session: aiohttp.ClientSession,
    services: Services,
    group: str,
    items: list[imageset.Item],
    sampler: procstat.RssSampler,
    roots: dict[str, int],
    time_limit: float,
) -> Measured:
    sampler.window()
    meter = procstat.CpuMeter(roots)
    meter.start()
    batch = await load.run_batch(session, services.api_base, _rows(services, items), time_limit=time_limit)
    cpu = meter.stop()
    return Measured(group, items, batch, cpu["trees"], sampler.window(), cpu)


async def _latency_phase(
    session: aiohttp.ClientSession,
    services: Services,
    items: list[imageset.Item],
    sampler: procstat.RssSampler,
    roots: dict[str, int],
    options: Options,
) -> tuple[Measured, list[dict[str, Any]], dict[str, Any]]:
    uploaded = asyncio.Event()
    stop = asyncio.Event()
    request: dict[str, str] = {}

    def on_uploaded(request_id: str) -> None:
        request["id"] = request_id
        uploaded.set()

    limits = aiohttp.TCPConnector(limit=1000)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=60)) as probes:

        async def get_status(k: int) -> int:
            async with probes.get(f"{services.api_base}/status/{request['id']}") as response:
                await response.read()
                return response.status

        async def post_upload(k: int) -> int:
            url = services.image_url(0, f"missing-latency-probe-{k}.jpg")
            form = aiohttp.FormData()
            form.add_field(
                "file",
                load.csv_body([(1, "Latency probe", url)]),
                filename="probe.csv",
                content_type="text/csv",
            )
            async with probes.post(services.api_base + "/upload", data=form) as response:
                await response.read()
                return response.status

        sampler.window()
        meter = procstat.CpuMeter(roots)
        meter.start()
        batch_task = asyncio.create_task(
            load.run_batch(
                session,
                services.api_base,
                _rows(services, items),
                time_limit=options.timeout,
                on_uploaded=on_uploaded,
            )
        )
        waiter = asyncio.create_task(uploaded.wait())
        await asyncio.wait([batch_task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        # This process's own objects frozen, so that a full collection here does not
        # hold back probes and count as the service's latency.
        gc.collect()
        gc.freeze()
        lag_before = await load.loop_lag(probes, services.api_base)
        own_lags: list[float] = []
        # The API's measure of its loop, on this one: its stalls would count as the service's.
        own_watch = asyncio.create_task(metrics.watch_event_loop(own_lags.append))
        streams = [
            asyncio.create_task(load.open_loop("GET /status/{id}", options.status_rate, get_status, stop)),
            asyncio.create_task(
                load.open_loop("POST /upload (1-row CSV)", options.upload_rate, post_upload, stop)
            ),
        ]
        try:
            batch = await batch_task
        finally:
            stop.set()
            results = await asyncio.gather(*streams)
            gc.unfreeze()
            own_watch.cancel()
            await asyncio.gather(own_watch, return_exceptions=True)
        lag = load.lag_summary(lag_before, await load.loop_lag(probes, services.api_base))
        lag["bench_timers"] = len(own_lags)
        lag["bench_over_50ms"] = sum(1 for x in own_lags if x > 0.05)
        lag["bench_max_ms"] = round(1000 * max(own_lags, default=0.0), 1)
        cpu = meter.stop()
    measured = Measured("all", items, batch, cpu["trees"], sampler.window(), cpu)
    return measured, [r.summary() for r in results], lag


async def _profile_phase(
    session: aiohttp.ClientSession,
    services: Services,
    items: list[imageset.Item],
    options: Options,
) -> dict[str, Any]:
    executable = profiling.find_py_spy()
    if executable is None:
        return {"error": "py-spy is not installed: make install (it is a development dependency)"}
    output = options.profile_output
    output.unlink(missing_ok=True)
    recorder = profiling.Recorder(
        executable, services.child("worker").popen.pid, output, rate=options.profile_rate
    )
    await asyncio.sleep(1.0)  # py-spy attaches
    if recorder.popen.poll() is not None:
        return {"error": f"py-spy could not attach: {recorder.message()}"}
    try:
        batch = await load.run_batch(
            session, services.api_base, _rows(services, items), time_limit=options.timeout
        )
    finally:
        written = await asyncio.to_thread(recorder.stop)
    if not written:
        return {"error": f"py-spy wrote nothing: {recorder.message()}"}
    summary = profiling.summarize(
        profiling.parse_raw(output.read_text()), rate=options.profile_rate, seconds=recorder.seconds
    )
    return summary | {
        "rate_hz": options.profile_rate,
        "raw_output": str(output),
        "batch_seconds": round(batch.seconds, 3),
        "images": len(items),
    }


async def run(services: Services, items: list[imageset.Item], options: Options) -> PipelineResults:
    """All phases, against services that are already running."""
    roots = services.roots()
    watched = {name: roots[name] for name in ("api", "worker", "postgres", "s3 (rclone)")}
    sampler = procstat.RssSampler(watched, interval=0.05, trees={"postgres"})
    sampler.start()
    groups = imageset.by_class(items)
    throughput: list[ClassRuns] = []
    latency_batch: Measured | None = None
    latency: list[dict[str, Any]] = []
    api_loop_lag: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    rerun_results: dict[str, Any] | None = None
    tiny_results: dict[str, Any] | None = None
    settled: dict[str, dict[str, Any]] = {}

    async def settle(phase: str) -> None:
        # Nothing an earlier request left (its finishing, the latency phase's one-row
        # uploads, autovacuum) runs inside this one's window or on its cores.
        found = await quiet.wait(services.database_url, roots)
        settled[phase] = found
        if not found["quiet"]:
            print(
                f"bench: {phase}: still not quiet after {found['waited_seconds']:.0f} s: "
                f"{found['pending_at_last']}, services {found['services_cores']:.2f} cores",
                flush=True,
            )
        elif found["waited_seconds"] > 1.0:
            print(f"bench: {phase}: waited {found['waited_seconds']:.1f} s for quiet", flush=True)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            if options.warmup:
                warm = [
                    imageset.Item(index=i + 1, file=item.file)
                    for i, item in enumerate(items[: options.warmup])
                ]
                print(f"bench: warm-up, {len(warm)} images", flush=True)
                await load.run_batch(
                    session, services.api_base, _rows(services, warm), time_limit=options.timeout
                )
            for group, group_items in groups.items():
                print(
                    f"bench: throughput, {len(group_items)} images of class {group}, {options.repeat} times",
                    flush=True,
                )
                runs: list[Measured] = []
                disturbed: list[Measured] = []
                # A request during which other processes used the CPU is sent again, up to
                # RETRIES more times; the median is taken over the undisturbed ones if enough.
                while len(runs) < options.repeat and len(disturbed) <= RETRIES:
                    await settle(f"throughput {group} {len(runs) + len(disturbed) + 1}")
                    measured = await _measured_batch(
                        session, services, group, group_items, sampler, roots, options.timeout
                    )
                    if options.paired is not None:
                        sources = [item.file.data for item in group_items]
                        with services.paused():
                            measured.paired = await asyncio.to_thread(options.paired, sources)
                        # Continued, the API first runs its overdue timers, among them the
                        # close of this session's idle keep-alive connection: let that
                        # happen before the next request, rather than race it.
                        await asyncio.sleep(1.0)
                    contended = measured.machine["foreign_cores"] > CONTENDED
                    (disturbed if contended else runs).append(measured)
                    if contended:
                        print(f"bench: other processes used the CPU; sending the {group} request again")
                        await asyncio.sleep(1.0)
                if len(runs) < options.repeat:
                    runs += sorted(disturbed, key=lambda m: m.machine["foreign_cores"])[
                        : options.repeat - len(runs)
                    ]
                throughput.append(ClassRuns(group, runs, retried=len(disturbed)))
            rate = sum(len(c.median.items) for c in throughput) / sum(
                c.median.batch.seconds for c in throughput
            )
            if options.latency:
                latency_items = expanded(items, options.latency_seconds, rate)
                print(
                    f"bench: latency, {len(latency_items)} images with GET /status at "
                    f"{options.status_rate:g}/s and POST /upload at {options.upload_rate:g}/s (open loop)",
                    flush=True,
                )
                await settle("latency")
                latency_batch, latency, api_loop_lag = await _latency_phase(
                    session, services, latency_items, sampler, roots, options
                )
            if options.profile:
                profile_items = expanded(items, options.profile_seconds, rate)
                print(f"bench: profile, {len(profile_items)} images with py-spy on the worker", flush=True)
                await settle("profile")
                profile = await _profile_phase(session, services, profile_items, options)
            if options.rerun_images:
                print(
                    f"bench: re-run, a catalog of {options.rerun_images} images sent three times", flush=True
                )
                rerun_results = await rerun.run(
                    session,
                    services,
                    items,
                    options.rerun_images,
                    options.timeout,
                    options.pg_statements,
                    settle=settle,
                )
            if options.tiny_images:
                print(f"bench: tiny images, {options.tiny_images} 64x48 JPEGs in one request", flush=True)
                tiny_results = await tiny.run(
                    session, services, options.tiny_images, options.timeout, options.pg_statements, settle
                )
    finally:
        sampler.stop()
    # Read before the large uploads: the worker is stopped there, and the API's peak
    # from a 50 MB CSV is that phase's own figure.
    hwm = {name: procstat.status_kib(roots[name], "VmHWM") for name in ("api", "worker")}
    peaks = sampler.overall()
    large: uploads.LargeUploads | None = None
    if options.large_uploads:
        await settle("large uploads")
        print("bench: large uploads, stopping the worker (its queued images are never processed)", flush=True)
        names = list(dict.fromkeys(item.file.name for item in items))
        large = await uploads.run(
            services,
            names,
            rows=options.upload_rows,
            repeat=options.upload_repeat,
            large_csv_mb=options.large_csv_mb,
        )
    return PipelineResults(
        throughput=throughput,
        latency_batch=latency_batch,
        latency=latency,
        api_loop_lag=api_loop_lag,
        profile=profile,
        peak_rss_kib=peaks,
        vm_hwm_kib=hwm,
        rss_samples=sampler.samples,
        pids=roots,
        large_uploads=large,
        rerun=rerun_results,
        tiny=tiny_results,
        quiet=settled,
    )

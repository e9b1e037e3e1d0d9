"""The ceiling: the same images through libvips alone, in this process.

``service`` is the service's own ``imgsvc.compress.compress`` with the service's image
limits (so every setting is the service's, including any given with ``--env``), run
in a thread pool as wide as the service's image concurrency. The
other variants call pyvips directly and add one encode setting at a time, so the
difference between two neighbours is what that setting costs:

    plain        decode (sequential access) + jpegsave_buffer(Q=50), no options
    +optimize    ... optimize_coding=True (Huffman tables computed per image)
    +autorot     ... autorot() (random access when the EXIF orientation is not 1)
    +icc         ... icc_transform("srgb", embedded=True) where there is an ICC profile

They run on the JPEG sources only: the settings in question are JPEG's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyvips

from bench import imageset, procstat
from imgsvc import compress, memory

CONTENDED = 0.1  # cores used by other processes above which a pass is done again
RETRIES = 3


def _service(limits: compress.Limits, large_concurrency: int) -> Callable[[bytes], int]:
    """The service's compress(), under the service's large-photo rule (no byte budget)."""
    budget = memory.MemoryBudget(0, large_concurrency)

    def run(data: bytes) -> int:
        return len(compress.compress(data, limits, budget).data)

    return run


def _variant(*, optimize: bool, autorot: bool, icc: bool) -> Callable[[bytes], int]:
    def run(data: bytes) -> int:
        access = "sequential"
        if autorot:
            header = pyvips.Image.new_from_buffer(data, "")
            orientation = header.get("orientation") if header.get_typeof("orientation") else 1
            if orientation not in (0, 1):
                access = "random"  # rotating needs random access, as in the service
        image = pyvips.Image.new_from_buffer(data, "", access=access)
        if autorot:
            image = image.autorot()
        if icc and image.get_typeof("icc-profile-data"):
            image = image.icc_transform("srgb", embedded=True, intent="perceptual")
        options: dict[str, Any] = {"Q": 50}
        if optimize:
            options["optimize_coding"] = True
        return len(image.jpegsave_buffer(**options))

    return run


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    """One way of encoding, with its label for the report."""

    key: str
    label: str
    run: Callable[[bytes], int]
    jpeg_only: bool


VARIANTS: tuple[Variant, ...] = (
    Variant("plain", "decode + jpegsave Q=50", _variant(optimize=False, autorot=False, icc=False), True),
    Variant("optimize", "+ optimize_coding", _variant(optimize=True, autorot=False, icc=False), True),
    Variant("autorot", "+ autorot", _variant(optimize=True, autorot=True, icc=False), True),
    Variant("icc", "+ icc_transform to sRGB", _variant(optimize=True, autorot=True, icc=True), True),
)


@dataclasses.dataclass
class PoolRun:
    """One pass of a variant over some images."""

    seconds: float
    cpu_seconds: float
    out_bytes: int
    failures: int
    foreign_cores: float = 0.0
    retries: int = 0


@dataclasses.dataclass
class Measured:
    """A variant on one group of images: the median of its passes."""

    variant: str
    label: str
    group: str
    distinct_images: int
    images: int
    megapixels: float
    source_bytes: int
    runs: list[PoolRun]

    @property
    def median(self) -> PoolRun:
        """The pass with the median wall time."""
        ordered = sorted(self.runs, key=lambda r: r.seconds)
        return ordered[(len(ordered) - 1) // 2]

    def as_json(self) -> dict[str, Any]:
        """Figures for the report."""
        m = self.median
        ok = self.images - m.failures
        return {
            "variant": self.variant,
            "label": self.label,
            "group": self.group,
            "distinct_images": self.distinct_images,
            "images": self.images,
            "failures": m.failures,
            "megapixels": round(self.megapixels, 3),
            "source_bytes": self.source_bytes,
            "seconds": round(m.seconds, 4),
            "images_per_s": round(self.images / m.seconds, 3) if m.seconds else None,
            "megapixels_per_s": round(self.megapixels / m.seconds, 3) if m.seconds else None,
            "cpu_seconds": round(m.cpu_seconds, 4),
            "cpu_ms_per_image": round(1000 * m.cpu_seconds / self.images, 2) if self.images else None,
            "cpu_ms_per_megapixel": round(1000 * m.cpu_seconds / self.megapixels, 2)
            if self.megapixels
            else None,
            "out_bytes_per_image": round(m.out_bytes / ok) if ok else None,
            "passes_seconds": [round(r.seconds, 4) for r in self.runs],
            "passes_foreign_cores": [r.foreign_cores for r in self.runs],
            "passes_retried": sum(r.retries for r in self.runs),
        }


def _one_pass(pool: ThreadPoolExecutor, run: Callable[[bytes], int], datas: Sequence[bytes]) -> PoolRun:
    def safe(data: bytes) -> int | None:
        try:
            return run(data)
        except Exception:
            return None

    meter = procstat.CpuMeter()
    meter.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sizes = list(pool.map(safe, datas))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return PoolRun(
        seconds=wall,
        cpu_seconds=cpu,
        out_bytes=sum(s for s in sizes if s is not None),
        failures=sum(1 for s in sizes if s is None),
        foreign_cores=meter.stop()["foreign_cores"],
    )


def _quiet_pass(pool: ThreadPoolExecutor, run: Callable[[bytes], int], datas: Sequence[bytes]) -> PoolRun:
    """A pass, done again (up to RETRIES times) while other processes use the CPU; the
    least disturbed attempt is kept."""
    attempts = [_one_pass(pool, run, datas)]
    while attempts[-1].foreign_cores > CONTENDED and len(attempts) <= RETRIES:
        time.sleep(1.0)
        attempts.append(_one_pass(pool, run, datas))
    best = min(attempts, key=lambda r: r.foreign_cores)
    best.retries = len(attempts) - 1
    return best


def paired_pass(
    datas: Sequence[bytes], *, threads: int, large_concurrency: int, limits: compress.Limits
) -> dict[str, Any]:
    """One ceiling pass over ``datas`` (the service's compress(), as in ``measure``), for a
    request's images right after the request, so that the two are measured minutes apart
    at most rather than across the whole run: a virtual machine's speed can drift by
    several percent in that time."""
    compress.configure()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-paired") as pool:
        list(pool.map(lambda _: None, range(threads)))
        run = _quiet_pass(pool, _service(limits, large_concurrency), datas)
    return {
        "images": len(datas),
        "failures": run.failures,
        "seconds": round(run.seconds, 4),
        "images_per_s": round(len(datas) / run.seconds, 3) if run.seconds else None,
        "cpu_seconds": round(run.cpu_seconds, 4),
        "foreign_cores": run.foreign_cores,
        "retries": run.retries,
    }


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclasses.dataclass
class CodecResults:
    """The ceiling per size class, and the setting variants per size class."""

    threads: int
    large_concurrency: int
    progressive_solo_pixels: int
    rounds: int
    ceiling: dict[str, Measured]
    variants: dict[str, list[Measured]]
    rss_before_kib: int | None
    peak_rss_kib: int | None
    machine: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """Figures for the report."""
        return {
            "threads": self.threads,
            "large_concurrency": self.large_concurrency,
            "progressive_solo_pixels": self.progressive_solo_pixels,
            "rounds": self.rounds,
            "rss_before_kib": self.rss_before_kib,
            "peak_rss_kib": self.peak_rss_kib,
            "machine_cpu": {k: v for k, v in self.machine.items() if k != "trees"},
            "ceiling": {group: m.as_json() for group, m in self.ceiling.items()},
            "variants": {group: [m.as_json() for m in ms] for group, ms in self.variants.items()},
        }


def measure(
    groups: dict[str, list[imageset.Item]],
    *,
    threads: int,
    large_concurrency: int,
    rounds: int,
    min_seconds: float,
    limits: compress.Limits,
    settings: bool = True,
) -> CodecResults:
    """The ceiling and (with ``settings``) the variants on every group, ``rounds`` passes
    each, interleaved.

    A first, untimed pass of each warms up and calibrates: short lists are repeated so
    that a timed pass lasts at least ``min_seconds`` (a rate, not a total, is wanted).
    """
    compress.configure()
    service = _service(limits, large_concurrency)
    ceiling = Variant("service", "service compress()", service, False)
    variants = [*VARIANTS, Variant("service_jpeg", "service compress()", service, True)]
    plan: list[tuple[Variant, str, list[imageset.Item]]] = []
    for group, items in groups.items():
        plan.append((ceiling, group, items))
        jpegs = [item for item in items if item.file.format == "jpeg"] if settings else []
        if jpegs:
            plan += [(variant, group, jpegs) for variant in variants]
    before = procstat.status_kib(os.getpid(), "VmRSS")
    reset = _reset_peak_rss()
    meter = procstat.CpuMeter()
    meter.start()
    measured: dict[tuple[str, str], tuple[Measured, list[bytes]]] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-codec") as pool:
        list(pool.map(lambda _: None, range(threads)))  # start the threads before timing
        for variant, group, items in plan:
            calibration = _one_pass(pool, variant.run, [item.file.data for item in items])
            copies = max(1, min(50, math.ceil(min_seconds / max(calibration.seconds, 1e-3))))
            expanded = list(items) * copies
            measured[(variant.key, group)] = (
                Measured(
                    variant=variant.key,
                    label=variant.label,
                    group=group,
                    distinct_images=len(items),
                    images=len(expanded),
                    megapixels=imageset.megapixels(expanded),
                    source_bytes=imageset.source_bytes(expanded),
                    runs=[],
                ),
                [item.file.data for item in expanded],
            )
        for _ in range(rounds):
            for variant, group, _items in plan:
                result, datas = measured[(variant.key, group)]
                result.runs.append(_quiet_pass(pool, variant.run, datas))
    machine = meter.stop()
    peak = procstat.status_kib(os.getpid(), "VmHWM") if reset else None
    return CodecResults(
        threads=threads,
        large_concurrency=large_concurrency,
        progressive_solo_pixels=limits.progressive_solo_pixels,
        rounds=rounds,
        ceiling={group: measured[("service", group)][0] for group in groups},
        variants={
            group: [measured[(v.key, group)][0] for v in variants if (v.key, group) in measured]
            for group in groups
        },
        rss_before_kib=before,
        peak_rss_kib=peak,
        machine=machine,
    )

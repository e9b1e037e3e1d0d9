"""The ceiling: the same images through libvips alone, in this process.

Three ways, on the same images, with the same threads, in the same run:

    plain        decode (sequential access) + jpegsave_buffer(Q=the quality rule's), no
                 metadata: the bare codec loop with the standard Huffman tables
    optimize     ... optimize_coding=True (Huffman tables computed per image)
    service      the service's own ``imgsvc.compress.compress`` with the service's image
                 limits (so every setting is the service's, including any given with
                 ``--env``) and its rule for large photos at once

in a thread pool as wide as the service's image concurrency. The headline ceiling of
a size class is the bare loop that makes the same bytes as the service (within
``SAME_BYTES``): the service must be measured against the codec doing the same work,
not against itself. Both loops take the quality from the service's quality rule (half
the source's), which is what makes their bytes comparable.

The encode-settings table adds one setting at a time to the bare loop on the JPEG
sources, so that the difference between two neighbours is what that setting costs:

    +autorot     ... autorot() (random access when the EXIF orientation is not 1)
    +icc         ... icc_transform("srgb", embedded=True) wherever there is an ICC
                 profile, as a service that trusts no profile would
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
from imgsvc import compress, memory, quality

CONTENDED = 0.1  # cores used by other processes above which a pass is done again
RETRIES = 3
#: A loop makes "the same bytes" as the service when its output is within this fraction.
SAME_BYTES = 0.02
#: The loops the headline ceiling is chosen from, in order of preference.
LOOPS = ("optimize", "plain")


def _service(limits: compress.Limits, large_concurrency: int) -> Callable[[bytes], int]:
    """The service's compress(), under the service's large-photo rule (no byte budget)."""
    budget = memory.MemoryBudget(0, large_concurrency)

    def run(data: bytes) -> int:
        return len(compress.compress(data, limits, budget).data)

    return run


def _loop(
    limits: compress.Limits, *, optimize: bool | None, autorot: bool = False, icc: bool = False
) -> Callable[[bytes], int]:
    """The bare codec loop at the quality rule's quality, without metadata; ``optimize``
    None takes the service's Huffman rule (``Limits.optimizes``)."""

    def run(data: bytes) -> int:
        q_in = quality.estimate_jpeg_quality(data) or quality.LOSSLESS_QUALITY
        q = quality.target_quality(q_in, limits.quality_factor, limits.min_quality)
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
        tables = limits.optimizes(image.width * image.height) if optimize is None else optimize
        return len(image.jpegsave_buffer(Q=q, optimize_coding=tables, keep=pyvips.enums.ForeignKeep.NONE))

    return run


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    """One way of encoding, with its label for the report."""

    key: str
    label: str
    run: Callable[[bytes], int]


def variants(limits: compress.Limits, large_concurrency: int) -> dict[str, Variant]:
    """Every way of encoding measured, by key: the three-way ceiling's, then the settings'."""
    return {
        v.key: v
        for v in (
            Variant("plain", "bare loop, plain Huffman", _loop(limits, optimize=False)),
            Variant("optimize", "bare loop, optimize_coding", _loop(limits, optimize=True)),
            Variant("service", "service compress()", _service(limits, large_concurrency)),
            Variant("autorot", "+ autorot", _loop(limits, optimize=True, autorot=True)),
            Variant("icc", "+ icc_transform to sRGB", _loop(limits, optimize=True, autorot=True, icc=True)),
        )
    }


THREE_WAY = ("plain", "optimize", "service")
SETTINGS = ("plain", "optimize", "autorot", "icc", "service")


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
    """One ceiling pass over ``datas`` for a request's images right after the request, so
    that the two are measured minutes apart at most rather than across the whole run: a
    virtual machine's speed can drift by several percent in that time. The loop is the
    bare one with the service's Huffman rule, the one that makes the service's bytes."""
    del large_concurrency  # the bare loop has no rule for large photos
    compress.configure()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-paired") as pool:
        list(pool.map(lambda _: None, range(threads)))
        run = _quiet_pass(pool, _loop(limits, optimize=None), datas)
    return {
        "loop": "bare loop, the service's Huffman rule",
        "images": len(datas),
        "failures": run.failures,
        "seconds": round(run.seconds, 4),
        "images_per_s": round(len(datas) / run.seconds, 3) if run.seconds else None,
        "cpu_seconds": round(run.cpu_seconds, 4),
        "out_bytes": run.out_bytes,
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


def _matched(loops: dict[str, Measured]) -> dict[str, Any]:
    """The bare loop whose bytes are nearest the service's (preferring ``LOOPS``' order
    on a tie), whether that is within ``SAME_BYTES``, and the ratios against it."""
    service = loops["service"].as_json()
    served = service["out_bytes_per_image"] or 0

    def apart(key: str) -> float:
        made = loops[key].as_json()["out_bytes_per_image"] or 0
        return abs(made / served - 1) if served else math.inf

    key = min(LOOPS, key=lambda k: (round(apart(k), 4), LOOPS.index(k)))
    loop, plain = loops[key].as_json(), loops["plain"].as_json()
    return {
        "loop": key,
        "label": loop["label"],
        "bytes_apart": round(apart(key), 4),
        "same_bytes": apart(key) <= SAME_BYTES,
        "service_over_loop": round(service["images_per_s"] / loop["images_per_s"], 4)
        if service["images_per_s"] and loop["images_per_s"]
        else None,
        "service_bytes_over_plain": round(served / plain["out_bytes_per_image"], 4)
        if plain["out_bytes_per_image"]
        else None,
    }


@dataclasses.dataclass
class CodecResults:
    """The three-way ceiling per size class, and the setting variants per size class."""

    threads: int
    large_concurrency: int
    progressive_solo_pixels: int
    rounds: int
    loops: dict[str, dict[str, Measured]]
    variants: dict[str, list[Measured]]
    rss_before_kib: int | None
    peak_rss_kib: int | None
    machine: dict[str, Any]

    @property
    def ceiling(self) -> dict[str, Measured]:
        """Per group, the bare loop that makes the service's bytes: the headline ceiling."""
        return {group: loops[_matched(loops)["loop"]] for group, loops in self.loops.items()}

    def as_json(self) -> dict[str, Any]:
        """Figures for the report."""
        return {
            "threads": self.threads,
            "large_concurrency": self.large_concurrency,
            "progressive_solo_pixels": self.progressive_solo_pixels,
            "rounds": self.rounds,
            "same_bytes_within": SAME_BYTES,
            "rss_before_kib": self.rss_before_kib,
            "peak_rss_kib": self.peak_rss_kib,
            "machine_cpu": {k: v for k, v in self.machine.items() if k != "trees"},
            "ceiling": {group: m.as_json() for group, m in self.ceiling.items()},
            "matched": {group: _matched(loops) for group, loops in self.loops.items()},
            "three_way": {
                group: {key: m.as_json() for key, m in loops.items()} for group, loops in self.loops.items()
            },
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
    """The three-way ceiling and (with ``settings``) the variants on every group,
    ``rounds`` passes each, interleaved.

    A first, untimed pass of each warms up and calibrates: short lists are repeated so
    that a timed pass lasts at least ``min_seconds`` (a rate, not a total, is wanted).
    The settings rows of a group whose images are all JPEGs are the three-way's own.
    """
    compress.configure()
    ways = variants(limits, large_concurrency)
    # (measurement key, variant, group, items)
    plan: list[tuple[str, Variant, str, list[imageset.Item]]] = []
    settings_keys: dict[str, list[str]] = {}
    for group, items in groups.items():
        plan += [(f"{key}/{group}", ways[key], group, items) for key in THREE_WAY]
        jpegs = [item for item in items if item.file.format == "jpeg"] if settings else []
        if not jpegs:
            continue
        subset = "" if len(jpegs) == len(items) else "/jpeg"
        settings_keys[group] = [f"{key}/{group}{subset if key in THREE_WAY else '/jpeg'}" for key in SETTINGS]
        plan += [
            (measured_key, ways[key], group, jpegs)
            for key, measured_key in zip(SETTINGS, settings_keys[group], strict=True)
            if measured_key.endswith("/jpeg")
        ]
    before = procstat.status_kib(os.getpid(), "VmRSS")
    reset = _reset_peak_rss()
    meter = procstat.CpuMeter()
    meter.start()
    measured: dict[str, tuple[Measured, list[bytes]]] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-codec") as pool:
        list(pool.map(lambda _: None, range(threads)))  # start the threads before timing
        for key, variant, group, items in plan:
            calibration = _one_pass(pool, variant.run, [item.file.data for item in items])
            copies = max(1, min(50, math.ceil(min_seconds / max(calibration.seconds, 1e-3))))
            expanded = list(items) * copies
            measured[key] = (
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
            for key, variant, _group, _items in plan:
                result, datas = measured[key]
                result.runs.append(_quiet_pass(pool, variant.run, datas))
    machine = meter.stop()
    peak = procstat.status_kib(os.getpid(), "VmHWM") if reset else None
    return CodecResults(
        threads=threads,
        large_concurrency=large_concurrency,
        progressive_solo_pixels=limits.progressive_solo_pixels,
        rounds=rounds,
        loops={group: {key: measured[f"{key}/{group}"][0] for key in THREE_WAY} for group in groups},
        variants={group: [measured[key][0] for key in keys] for group, keys in settings_keys.items()},
        rss_before_kib=before,
        peak_rss_kib=peak,
        machine=machine,
    )

"""`python -m bench`: run the benchmark, print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyvips

import imgsvc
from bench import codec, imageset, pipeline, procstat, report
from bench.services import Services, clean_environment
from imgsvc import resources, settings

REPO = Path(__file__).parent.parent


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
        return value

    return parse


def _not_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark imgsvc end to end (PostgreSQL, S3, API and worker as processes) "
        "against the libvips ceiling. See docs/performance.md.",
    )
    p.add_argument("--images", type=_positive(int), default=200, help="images to send (default 200)")
    p.add_argument(
        "--rerun-images",
        type=int,
        default=200,
        help="images in the re-run phase's catalog, sent three times (default 200; 0 skips the phase)",
    )
    p.add_argument(
        "--tiny-images",
        type=int,
        default=2000,
        help="distinct 64x48 JPEGs in the tiny-image phase's request, the pipeline's own cost "
        "(default 2000; 0 skips the phase)",
    )
    p.add_argument(
        "--pg-statements",
        action="store_true",
        help="preload pg_stat_statements and report PostgreSQL's time by statement in the re-run "
        "and tiny-image phases",
    )
    p.add_argument(
        "--images-dir",
        type=Path,
        default=imageset.BUNDLED,
        help="a folder of images, cycled through in name order to reach --images (default bench/images)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results/bench.json"),
        help="the JSON results file (default bench-results/bench.json)",
    )
    p.add_argument(
        "--status-rate",
        type=float,
        default=50.0,
        help="GET /status per second while the worker is saturated, open loop (50; the target is "
        "p99 under 50 ms at 50/s)",
    )
    p.add_argument("--upload-rate", type=float, default=2.0, help="POST /upload per second, open loop (2)")
    p.add_argument(
        "--repeat", type=_positive(int), default=3, help="requests per size class; the median is reported (3)"
    )
    p.add_argument(
        "--latency-seconds",
        type=_positive(float),
        default=10.0,
        help="make the latency phase's request last about this long, repeating the images (10)",
    )
    p.add_argument("--no-latency", action="store_true", help="skip the latency phase")
    p.add_argument(
        "--no-paired",
        action="store_true",
        help="skip the ceiling pass run right after each throughput request (the paired ratio)",
    )
    p.add_argument("--rounds", type=_positive(int), default=3, help="passes of each ceiling variant (3)")
    p.add_argument(
        "--no-settings",
        action="store_true",
        help="measure only the ceiling at the end, not what each encode setting costs (for long runs)",
    )
    p.add_argument(
        "--ceiling-seconds",
        type=_positive(float),
        default=1.0,
        help="shortest timed pass of a ceiling variant; short image lists are repeated (1)",
    )
    p.add_argument(
        "--no-large-uploads",
        action="store_true",
        help="skip the large-uploads phase (last; it stops the worker, then times POST /upload of big CSVs)",
    )
    p.add_argument(
        "--upload-rows",
        type=_positive(int),
        default=10_000,
        help="rows (2 image URLs each) of the CSV the large-uploads phase times (10000)",
    )
    p.add_argument(
        "--upload-repeat",
        type=_positive(int),
        default=7,
        help="uploads of that CSV, one after the other; the median is reported (7)",
    )
    p.add_argument(
        "--large-csv-mb",
        type=_not_negative,
        default=50.0,
        help="also upload a CSV of just under this many MiB, watching the API's RSS; 0 skips it (50)",
    )
    p.add_argument("--warmup", type=int, default=4, help="images in the unmeasured warm-up request (4)")
    p.add_argument("--timeout", type=_positive(float), default=600.0, help="seconds a request may take (600)")
    p.add_argument("--profile", action="store_true", help="one more request with py-spy on the worker")
    p.add_argument("--profile-rate", type=_positive(int), default=100, help="py-spy samples per second (100)")
    p.add_argument(
        "--profile-seconds", type=_positive(float), default=15.0, help="length of the profiled request (15)"
    )
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the imgsvc processes, e.g. IMGSVC_WORKER_CONCURRENCY=8 (repeatable)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, database, bucket)")
    return p


def _first_line(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _git(*args: str) -> str:
    git = shutil.which("git")
    if git is None:
        return ""
    try:
        done = subprocess.run([git, "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def machine(versions: dict[str, str]) -> dict[str, Any]:
    """The machine and the versions of what ran."""
    mem_kib = int(_first_line("/proc/meminfo", "MemTotal").split()[0] or 0)
    commit = _git("rev-parse", "--short", "HEAD") or "?"
    if _git("status", "--porcelain", "--", "imgsvc", "sql"):
        commit += ", imgsvc/ or sql/ modified"
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _first_line("/proc/cpuinfo", "model name"),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
        "pyvips": pyvips.__version__,
        "postgresql": versions.get("postgresql", "?"),
        "rclone": versions.get("rclone", "?"),
        "imgsvc": imgsvc.__version__,
        "git_commit": commit,
    }


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    """Run everything; exit 1 with a message if the system under test misbehaves."""
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.monotonic()
    files = imageset.read_folder(args.images_dir)
    items = imageset.cycle(files, args.images)
    groups = imageset.by_class(items)
    extra_env = dict(args.env)
    out: Path = args.out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"bench: {len(items)} images from {args.images_dir} ({len(files)} files; "
        + ", ".join(f"{k} {len(v)}" for k, v in groups.items())
        + ")",
        flush=True,
    )

    idle = procstat.CpuMeter()
    idle.start()
    time.sleep(1.0)
    before_start = idle.stop()
    if before_start["foreign_cores"] > 0.25:
        print(
            f"bench: warning: the machine is busy before the start "
            f"({before_start['foreign_cores']:.2f} cores used by other processes); the figures will be noisy",
            flush=True,
        )

    services = Services(
        args.images_dir,
        extra_env=extra_env,
        keep=args.keep,
        log_dir=out.with_name(f"{out.stem}-logs"),
        pg_statements=args.pg_statements,
    )
    # The ceiling runs with the settings the service ran with: its image limits, its
    # image concurrency as the thread count, and its rule for large photos at once;
    # read from the services' environment, so an IMGSVC_* exported in the shell (which
    # the services do not get) cannot change the ceiling alone.
    config = settings.from_env({**clean_environment(), **extra_env})
    threads = config.image_concurrency
    limits = resources.image_limits(config)
    paired = functools.partial(
        codec.paired_pass, threads=threads, large_concurrency=config.large_image_concurrency, limits=limits
    )
    options = pipeline.Options(
        warmup=min(args.warmup, len(items)),
        repeat=args.repeat,
        status_rate=args.status_rate,
        upload_rate=args.upload_rate,
        timeout=args.timeout,
        latency=not args.no_latency,
        latency_seconds=args.latency_seconds,
        profile=args.profile,
        profile_rate=args.profile_rate,
        profile_seconds=args.profile_seconds,
        profile_output=out.with_name(f"{out.stem}-worker-profile.txt"),
        large_uploads=not args.no_large_uploads,
        upload_rows=args.upload_rows,
        upload_repeat=args.upload_repeat,
        large_csv_mb=args.large_csv_mb,
        rerun_images=args.rerun_images,
        tiny_images=args.tiny_images,
        pg_statements=args.pg_statements,
        paired=None if args.no_paired else paired,
    )
    try:
        print("bench: starting PostgreSQL, rclone, the image server, the API and a worker", flush=True)
        services.start()
        measured = asyncio.run(pipeline.run(services, items, options))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        for child in services.children:
            print(f"--- {child.name} log (last lines) ---\n{child.tail(15)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        print("bench: stopping the services", flush=True)
        exit_codes = services.stop()
    # rclone ends with the SIGTERM's status; imgsvc and the image server should end with 0
    # (None: still running after SIGKILL).
    unclean = {name: code for name, code in exit_codes.items() if code != 0 and name != "rclone"}

    print(f"bench: ceiling, {threads} threads, {args.rounds} passes of each variant", flush=True)
    codec_results = codec.measure(
        groups,
        threads=threads,
        large_concurrency=config.large_image_concurrency,
        rounds=args.rounds,
        min_seconds=args.ceiling_seconds,
        limits=limits,
        settings=not args.no_settings,
    )

    codec_json = codec_results.as_json()
    # A ceiling that failed an image timed a refusal, not the codec (a failure is fast).
    codec_failures = [
        f"{m['group']} {m['label']}: {m['failures']} of {m['images']} images failed"
        for m in [
            *(way for ways in codec_json["three_way"].values() for way in ways.values()),
            *(v for vs in codec_json["variants"].values() for v in vs),
        ]
        if m["failures"]
    ] + [
        f"{m.group} paired ceiling pass: {m.paired['failures']} of {m.paired['images']} images failed"
        for c in measured.throughput
        for m in c.runs
        if m.paired and m.paired["failures"]
    ]

    results: dict[str, Any] = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(services.versions),
        "run": {
            "images": len(items),
            "images_dir": str(args.images_dir),
            "distinct_files": len(files),
            "files": [
                {
                    "name": f.name,
                    "bytes": len(f.data),
                    "width": f.width,
                    "height": f.height,
                    "megapixels": round(f.megapixels, 3),
                    "format": f.format,
                    "class": f.size_class.key,
                    "icc": f.has_icc,
                    "orientation": f.orientation,
                }
                for f in files
            ],
            "icc_images": sum(1 for i in items if i.file.has_icc),
            "rotated_images": sum(1 for i in items if i.file.orientation not in (0, 1)),
            "classes": {
                c.key: {
                    "label": c.label,
                    "low_mp": c.low,
                    "high_mp": c.high,
                    "images": len(groups.get(c.key, [])),
                }
                for c in imageset.CLASSES
            },
            "repeat": args.repeat,
            "status_rate": args.status_rate,
            "upload_rate": args.upload_rate,
            "large_uploads": not args.no_large_uploads,
            "upload_rows": args.upload_rows,
            "upload_repeat": args.upload_repeat,
            "large_csv_mb": args.large_csv_mb,
            "extra_env": extra_env,
            "service_exit_codes": exit_codes,
            "machine_cpu_before_start": {k: v for k, v in before_start.items() if k != "trees"},
            "out": str(out),
            "seconds": 0.0,
        },
        "pipeline": measured.as_json(),
        "codec": codec_json,
        "large_uploads": measured.large_uploads.as_json() if measured.large_uploads else None,
        "rerun": measured.rerun,
        "tiny": measured.tiny,
    }
    results["summary"] = report.summary_rows(results)
    results["three_way"] = report.three_way_rows(results)
    results["run"]["seconds"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report.render(results))
    # A request that did not complete, or a ceiling pass that failed an image, measured
    # something other than the pipeline or the codec (a failed image is cheap), so the
    # figures above are not to be trusted: say so and exit 1, after the JSON is written
    # for whoever looks into it.
    problems = [m for c in measured.throughput for m in c.runs if m.batch.status != "completed"]
    for m in problems:
        print(f"bench: the {m.group} request ended {m.batch.status}: {m.batch.errors[:3]}", file=sys.stderr)
    if unclean:
        print(f"bench: services exited with {unclean}", file=sys.stderr)
    for failure in codec_failures:
        print(f"bench: the ceiling's {failure}", file=sys.stderr)
    print(f"bench: done in {results['run']['seconds']:.0f} s")
    if problems or unclean or codec_failures:
        raise SystemExit(1)

"""How many S3 PUTs one event loop signs and sends, and what each costs it in CPU.

``python -m bench.s3put`` starts `rclone serve s3` (as `make bench` does) and PUTs
from one uvloop event loop, ``--concurrency`` at a time (IMGSVC_UPLOAD_CONCURRENCY's
default), through an aioboto3 client made as imgsvc makes it. It measures PUTs a
second and this process's CPU milliseconds a PUT (rclone's are not counted) for a few
client variants, in rounds that take every variant in turn, so that the ratios
between them come from the same minutes of a shared machine.

The variant ``one key`` PUTs the same key every time: botocore then finds the
endpoint rules' answer in its cache, so the difference from ``today`` is what the
per-key evaluation of S3's endpoint rules costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aioboto3
import aiobotocore.config
import uvloop

from bench.services import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, Services


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    """One way of making the client, or of calling it."""

    name: str
    config: dict[str, Any]
    same_key: bool = False


#: The client options of imgsvc/resources.py, without the timeouts.
TODAY: dict[str, Any] = {
    "retries": {"max_attempts": 3, "mode": "standard"},
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
    "signature_version": "s3v4",
}

VARIANTS = (
    Variant("today", TODAY),
    Variant("one key (endpoint rules cached)", TODAY, same_key=True),
    Variant("parameter_validation=False", {**TODAY, "parameter_validation": False}),
    Variant("addressing_style=path", {**TODAY, "s3": {"addressing_style": "path"}}),
    Variant(
        "parameter_validation=False, path",
        {**TODAY, "parameter_validation": False, "s3": {"addressing_style": "path"}},
    ),
)


async def _put_many(client: Any, count: int, body: bytes, concurrency: int, same_key: bool, tag: str) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        key = f"img/{tag}.jpg" if same_key else f"img/{tag}-{n:08d}.jpg"
        async with slots:
            await client.put_object(
                Bucket=BUCKET,
                Key=key,
                Body=body,
                ContentType="image/jpeg",
                CacheControl="public, max-age=31536000, immutable",
            )

    await asyncio.gather(*(one(n) for n in range(count)))


async def measure(
    endpoint: str, sizes: list[int], count: int, rounds: int, concurrency: int
) -> dict[str, Any]:
    """Every variant, every body size, ``rounds`` times in turn."""
    session = aioboto3.Session()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    clients: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        for variant in VARIANTS:
            config = aiobotocore.config.AioConfig(max_pool_connections=concurrency, **variant.config)
            clients[variant.name] = await stack.enter_async_context(
                session.client(
                    "s3",
                    region_name=REGION,
                    endpoint_url=endpoint,
                    aws_access_key_id=ACCESS_KEY,
                    aws_secret_access_key=SECRET_KEY,
                    config=config,
                )
            )
        for size in sizes:
            body = os.urandom(size)
            for index, variant in enumerate(VARIANTS):  # warm: connections, caches
                await _put_many(clients[variant.name], 50, body, concurrency, variant.same_key, f"w{index}")
            for round_ in range(rounds):
                for index, variant in enumerate(VARIANTS):
                    tag = f"{size}-{round_}-{index}"
                    cpu, wall = time.process_time(), time.perf_counter()
                    await _put_many(clients[variant.name], count, body, concurrency, variant.same_key, tag)
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    figures = results.setdefault(variant.name, {}).setdefault(
                        str(size), {"puts_per_second": [], "cpu_ms_per_put": []}
                    )
                    figures["puts_per_second"].append(count / wall)
                    figures["cpu_ms_per_put"].append(1000 * cpu / count)
    return {
        name: {
            size: {what: round(statistics.median(values), 3) for what, values in figures.items()}
            | {
                "cpu_ms_range": [
                    round(min(figures["cpu_ms_per_put"]), 3),
                    round(max(figures["cpu_ms_per_put"]), 3),
                ]
            }
            for size, figures in by_size.items()
        }
        for name, by_size in results.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.s3put", description=__doc__.splitlines()[0])
    p.add_argument("--puts", type=int, default=400, help="PUTs a variant a round (400)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the median reported (3)")
    p.add_argument("--sizes", default="2000,300000", help="body sizes in bytes (2000,300000)")
    p.add_argument("--concurrency", type=int, default=16, help="PUTs at once (16)")
    p.add_argument("--out", type=Path, default=Path("bench-results/s3put.json"))
    args = p.parse_args()
    services = Services(Path("."))
    try:
        services.start_s3()  # the store alone: no database, API or worker
        sizes = [int(s) for s in args.sizes.split(",")]
        result = uvloop.run(measure(services.s3_endpoint, sizes, args.puts, args.rounds, args.concurrency))
    finally:
        for child in services.children:
            child.terminate()
            child.stop(10)
        shutil.rmtree(services.work, ignore_errors=True)
    base = result["today"]
    print(f"{'variant':<36} {'body':>8} {'PUT/s':>8} {'CPU ms/PUT':>11} {'vs today':>9}")
    for name, by_size in result.items():
        for size, figures in by_size.items():
            ratio = figures["cpu_ms_per_put"] / base[size]["cpu_ms_per_put"]
            print(
                f"{name:<36} {size:>8} {figures['puts_per_second']:>8.0f} "
                f"{figures['cpu_ms_per_put']:>11.3f} {ratio:>9.3f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"argv": sys.argv[1:], "cores": os.cpu_count(), "results": result}, indent=2)
    )


if __name__ == "__main__":
    main()

"""The tiny-image phase: what the pipeline costs around a codec that costs nothing.

N distinct 64x48 JPEGs (the image server's ``/tiny/{index}.jpg``, default 2,000) in one
request, with reprocess=true so that every one is downloaded, compressed and stored. It
reports images a second, upload to completed_at, and the CPU milliseconds an image of
each process tree: API, worker, PostgreSQL, the S3 stand-in and the image server. With
``--pg-statements``, also the statements PostgreSQL spent that time on.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from bench import load, pgstat, procstat
from bench.services import Services

FIRST_INDEX = 2_000_000  # above every index the other phases use


async def run(
    session: aiohttp.ClientSession, services: Services, count: int, time_limit: float, statements: bool
) -> dict[str, Any]:
    """One request of ``count`` tiny images; raise RuntimeError unless it completes."""
    base = f"http://127.0.0.1:{services.image_port}/tiny"
    rows = [(FIRST_INDEX + n, f"Tiny product {n}", f"{base}/{FIRST_INDEX + n}.jpg") for n in range(count)]
    if statements:
        await pgstat.reset(services.database_url)
    meter = procstat.CpuMeter(services.roots())
    meter.start()
    batch = await load.run_batch(session, services.api_base, rows, time_limit=time_limit, reprocess=True)
    cpu = meter.stop()
    if batch.status != "completed":
        raise RuntimeError(f"the tiny-image request ended {batch.status}: {batch.errors[:3]}")
    result: dict[str, Any] = {
        "images": count,
        "seconds": round(batch.seconds, 3),
        "images_per_second": round(count / batch.seconds, 1),
        "cpu_ms_per_image": {
            name: round(1000 * seconds / count, 3) for name, seconds in cpu["trees"].items()
        },
        "foreign_cores": cpu["foreign_cores"],
    }
    if statements:
        result["statements"] = await pgstat.top(services.database_url, count)
    return result

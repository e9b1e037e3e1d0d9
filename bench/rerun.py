"""The re-run phase: a catalog sent again, as users send their daily feeds.

An N-image catalog (new URLs, so nothing of the other phases answers them) is sent:

1. first, with reprocess=true, so that every image is downloaded, compressed and
   stored whatever the earlier phases left in the records;
2. again, unchanged: the image server answers 304 to the validators it sent;
3. again, with 1% of its sources changed (other bytes at the same URLs);
4. then just the changed images, with reprocess=true: what compressing only them costs.

Each is timed from the upload to the request's completed_at; the image server says how
many answers carried a body, and the status API how many images were compressed (each
compressed image is one stored object) and reused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from bench import imageset, load, pgstat, procstat
from bench.services import Services

FIRST_INDEX = 1_000_000  # above every index the other phases use
CHANGED_SHARE = 0.01


@dataclasses.dataclass
class Run:
    """One request of the phase."""

    name: str
    batch: load.Batch
    bodies: int
    not_modified: int
    cpu: dict[str, Any]

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of every process tree of the system under test."""
        return float(sum(self.cpu["trees"].values()))

    def as_json(self) -> dict[str, Any]:
        reuse = self.batch.reuse
        return {
            "run": self.name,
            "images": self.batch.images,
            "status": self.batch.status,
            "seconds": round(self.batch.seconds, 3),
            "downloads": self.bodies,
            "not_modified": self.not_modified,
            "compressed": reuse.get("compressed"),
            "stored": reuse.get("compressed"),  # one object for each image compressed
            "reused": reuse.get("reused"),
            "bytes_saved": reuse.get("bytes_saved"),
            "cpu_ms_per_image": {
                name: round(1000 * seconds / self.batch.images, 2)
                for name, seconds in self.cpu["trees"].items()
            },
            "foreign_cores": self.cpu["foreign_cores"],
        }


async def _stats(session: aiohttp.ClientSession, services: Services) -> dict[str, int]:
    async with session.get(f"http://127.0.0.1:{services.image_port}/stats") as response:
        counts: dict[str, int] = await response.json()
    return counts


async def _run(
    session: aiohttp.ClientSession,
    services: Services,
    name: str,
    rows: Sequence[tuple[int, str, str]],
    *,
    reprocess: bool,
    time_limit: float,
    settle: Callable[[str], Awaitable[None]] | None = None,
) -> Run:
    if settle is not None:
        await settle(f"re-run {name}")
    before = await _stats(session, services)
    meter = procstat.CpuMeter(services.roots())
    meter.start()
    batch = await load.run_batch(session, services.api_base, rows, time_limit=time_limit, reprocess=reprocess)
    cpu = meter.stop()
    after = await _stats(session, services)
    if batch.status != "completed":
        raise RuntimeError(f"the re-run phase's {name} request ended {batch.status}: {batch.errors[:3]}")
    bodies, not_modified = (after[k] - before[k] for k in ("bodies", "not_modified"))
    return Run(name, batch, bodies, not_modified, cpu)


async def run(
    session: aiohttp.ClientSession,
    services: Services,
    items: Sequence[imageset.Item],
    size: int,
    time_limit: float,
    statements: bool = False,
    settle: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """The four requests, each once ``settle`` says nothing else runs, and the
    ratios the targets are set on."""
    files = [item.file for item in items]
    catalog = [imageset.Item(index=FIRST_INDEX + n, file=files[n % len(files)]) for n in range(size)]
    rows = [
        (item.index, f"Catalog product {item.index}", services.image_url(item.index, item.file.name))
        for item in catalog
    ]
    first = await _run(session, services, "first", rows, reprocess=True, time_limit=time_limit, settle=settle)
    if settle is not None:
        await settle("re-run unchanged")
    if statements:
        await pgstat.reset(services.database_url)
    unchanged = await _run(session, services, "unchanged", rows, reprocess=False, time_limit=time_limit)
    top = await pgstat.top(services.database_url, size) if statements else None
    # The changed sources: JPEGs where there are enough (bytes after the end of a JPEG
    # are ignored by every decoder), spread over the catalog.
    count = max(1, math.ceil(size * CHANGED_SHARE))
    jpegs = [n for n, item in enumerate(catalog) if item.file.format == "jpeg"] or list(range(size))
    changed = [jpegs[round(k * len(jpegs) / count)] for k in range(count)]
    for n in changed:
        async with session.post(
            f"http://127.0.0.1:{services.image_port}/change/{catalog[n].index}"
        ) as response:
            response.raise_for_status()
    one_percent = await _run(
        session, services, "1% changed", rows, reprocess=False, time_limit=time_limit, settle=settle
    )
    alone = await _run(
        session,
        services,
        "changed only",
        [rows[n] for n in changed],
        reprocess=True,
        time_limit=time_limit,
        settle=settle,
    )
    return {
        "images": size,
        "changed": count,
        "runs": [r.as_json() for r in (first, unchanged, one_percent, alone)],
        "unchanged_speedup": round(first.batch.seconds / unchanged.batch.seconds, 2),
        "changed_over_first": round(one_percent.batch.seconds / first.batch.seconds, 3),
        "changed_over_changed_only": round(one_percent.batch.seconds / alone.batch.seconds, 2),
        # The same ratio in CPU seconds of every process tree: steadier on a busy machine.
        "changed_over_changed_only_cpu": round(one_percent.cpu_seconds / max(alone.cpu_seconds, 1e-3), 2),
        "unchanged_statements": top,
    }

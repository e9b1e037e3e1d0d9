"""Quiet before a phase: nothing left running that an earlier phase started.

A phase that starts while the queue still holds an earlier phase's work (a request
still finishing, its output CSV or webhook not yet written, the latency phase's
one-row uploads) would count that work's CPU as its own and share the cores with it.
``wait`` holds the next phase until the database shows no open request, image, job or
webhook delivery, no statement running and no autovacuum worker, and the services'
process trees are idle; ``snapshot`` is what the report shows of it, with the size of
the tables an earlier phase grew.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import asyncpg

from bench import procstat

IDLE_CORES = 0.1  # the services' trees together, over a window of WINDOW seconds
WINDOW = 0.5
POLL = 0.2

# Everything that is still to do or doing, and what PostgreSQL runs meanwhile. The
# periodic maintenance jobs are left out: one is always due.
PENDING = """
SELECT
  (SELECT count(*) FROM procrastinate_jobs
   WHERE status IN ('todo', 'doing') AND queue_name <> 'maintenance') AS jobs,
  (SELECT count(*) FROM requests WHERE status IN ('queued', 'processing')) AS requests,
  (SELECT count(*) FROM images WHERE status IN ('queued', 'processing')) AS images,
  (SELECT count(*) FROM requests
   WHERE completed_at IS NOT NULL AND output_csv_url IS NULL) AS outputs,
  (SELECT count(*) FROM webhook_deliveries WHERE state IN ('pending', 'retrying')) AS webhooks,
  (SELECT count(*) FROM pg_stat_activity
   WHERE state = 'active' AND pid <> pg_backend_pid() AND backend_type = 'client backend') AS statements,
  (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker') AS autovacuum
"""

TABLES = """
SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid) AS bytes
FROM pg_stat_user_tables
WHERE relname IN ('requests', 'products', 'images', 'sources', 'outputs', 'webhook_deliveries',
                  'procrastinate_jobs', 'procrastinate_events')
ORDER BY relname
"""


async def pending(conn: asyncpg.Connection) -> dict[str, int]:
    """What is still open or running, by kind (all 0 when quiet)."""
    row = await conn.fetchrow(PENDING)
    assert row is not None
    return {key: int(value) for key, value in row.items()}


async def tables(conn: asyncpg.Connection) -> dict[str, dict[str, int]]:
    """Live and dead rows, and bytes with the indexes, of the tables the phases grow."""
    return {
        r["relname"]: {"live": r["n_live_tup"], "dead": r["n_dead_tup"], "bytes": r["bytes"]}
        for r in await conn.fetch(TABLES)
    }


def _idle_cores(roots: Mapping[str, int], seconds: float) -> float:
    meter = procstat.CpuMeter(roots)
    meter.start()
    time.sleep(seconds)
    cpu = meter.stop()
    return float(sum(cpu["trees"].values())) / float(cpu["wall_seconds"])


async def wait(url: str, roots: Mapping[str, int], limit: float = 120.0) -> dict[str, Any]:
    """Wait until nothing is open or running and the services are idle (at most
    ``limit`` seconds); what was found at first, how long it took, and whether it
    got quiet."""
    started = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        first = await pending(conn)
        found = first
        cores = 0.0
        while True:
            if not any(found.values()):
                cores = await asyncio.to_thread(_idle_cores, roots, WINDOW)
                if cores < IDLE_CORES:
                    break
            if time.monotonic() - started > limit:
                break
            await asyncio.sleep(POLL)
            found = await pending(conn)
        sizes = await tables(conn)
    finally:
        await conn.close()
    quiet = not any(found.values()) and cores < IDLE_CORES
    return {
        "quiet": quiet,
        "waited_seconds": round(time.monotonic() - started, 2),
        "pending_at_first": first,
        "pending_at_last": found,
        "services_cores": round(cores, 3),
        "tables": sizes,
    }

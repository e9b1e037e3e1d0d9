"""What PostgreSQL spent its time on, by statement (pg_stat_statements), for a phase.

Enabled by ``python -m bench --pg-statements`` where the server has the module: the
cluster is started with it preloaded, and each phase that reports it resets the
counters first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

SETTINGS = ("shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=all")


def available(bindir: Path) -> bool:
    """Whether this PostgreSQL installation has the module."""
    return any((bindir.parent / "lib").glob("pg_stat_statements.*")) or any(
        (bindir.parent / "lib" / "postgresql").glob("pg_stat_statements.*")
    )


async def reset(url: str) -> None:
    """Create the extension if needed, and start counting from zero."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def top(url: str, images: int, limit: int = 12) -> list[dict[str, Any]]:
    """The statements that took the most execution time since ``reset``, per image."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT calls, total_exec_time, total_plan_time, rows,"
            " shared_blks_hit + shared_blks_read AS blocks,"
            " query FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND query NOT LIKE '%pg_stat_statements%'"
            " ORDER BY total_exec_time + total_plan_time DESC LIMIT $1",
            limit,
        )
    finally:
        await conn.close()
    return [
        {
            "calls_per_image": round(r["calls"] / images, 3),
            "ms_per_image": round((r["total_exec_time"] + r["total_plan_time"]) / images, 4),
            "ms_per_call": round((r["total_exec_time"] + r["total_plan_time"]) / max(1, r["calls"]), 4),
            # Buffers a call reads: a plan whose cost grows with a table shows here.
            "blocks_per_call": round(r["blocks"] / max(1, r["calls"]), 1),
            "rows_per_call": round(r["rows"] / max(1, r["calls"]), 1),
            "query": " ".join(r["query"].split())[:110],
        }
        for r in rows
    ]

"""The schema: procrastinate's, then ours, as numbered files applied in order.

Each applied file is recorded in ``imgsvc_migrations``, so migrating is idempotent and
an older database is brought forward. An advisory lock keeps two processes that
migrate at once from racing.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from procrastinate import schema as procrastinate_schema

from imgsvc import db, errors

_LOCK_KEY = 0x696D6773  # "imgs"
_MIGRATION_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")

_CREATE_RECORD = """
CREATE TABLE IF NOT EXISTS imgsvc_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE imgsvc_migrations IS 'Schema files applied by imgsvc migrate.';
"""


def migration_files() -> list[tuple[int, Path]]:
    """The numbered schema files, in order."""
    found = []
    for path in db.sql_dir().iterdir():
        match = _MIGRATION_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def procrastinate_version() -> str:
    """The installed procrastinate version, whose schema we apply."""
    return metadata.version("procrastinate")


async def apply(url: str) -> list[str]:
    """Bring the database to the current schema; return the names of what was applied."""
    applied: list[str] = []
    pool = await db.create_pool(url, max_size=1)
    try:
        async with db.translated(), pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            try:
                if await conn.fetchval("SELECT to_regclass('procrastinate_jobs')") is None:
                    await conn.execute(procrastinate_schema.SchemaManager.get_schema())
                    applied.append(f"procrastinate {procrastinate_version()}")
                await conn.execute(_CREATE_RECORD)
                done = {r["version"] for r in await conn.fetch("SELECT version FROM imgsvc_migrations")}
                for version, path in migration_files():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(path.read_text())
                        await conn.execute(
                            "INSERT INTO imgsvc_migrations (version, name) VALUES ($1, $2)",
                            version,
                            path.name,
                        )
                    applied.append(path.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await pool.close()
    return applied


async def require_current(url: str) -> None:
    """Raise SchemaError unless the database at ``url`` is fully migrated."""
    pool = await db.create_pool(url, max_size=1)
    try:
        await check(pool)
    finally:
        await pool.close()


async def check(pool: db.Pool) -> None:
    """Raise SchemaError unless every schema file has been applied."""
    async with db.translated(), pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('imgsvc_migrations')") is None:
            raise errors.SchemaError(
                "the database has no imgsvc schema: run `imgsvc migrate` (or start with --migrate)"
            )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM imgsvc_migrations")}
        has_queue = await conn.fetchval("SELECT to_regclass('procrastinate_jobs')") is not None
    missing = [path.name for version, path in migration_files() if version not in done]
    if missing or not has_queue:
        what = ", ".join(missing) if missing else "procrastinate's schema"
        raise errors.SchemaError(
            f"the database schema is not current (missing {what}): "
            "run `imgsvc migrate` (or start with --migrate)"
        )

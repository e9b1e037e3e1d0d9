"""The schema: procrastinate's, then ours, as numbered files applied in order.

Each applied imgsvc file is recorded in ``imgsvc_migrations``, and each procrastinate
migration the database has in ``imgsvc_procrastinate_migrations``, so migrating is
idempotent and an older database is brought forward, procrastinate's part included.
An advisory lock keeps two processes that migrate at once from racing.

procrastinate ships its migrations as SQL files named
``{xx.yy.zz}_{nn}_{pre|post}_{what}.sql``: a ``pre`` one is applied before the new
code runs, a ``post`` one only once no process of the older code is left (files
older than its 3.0 have no word and count as ``post``). ``apply`` applies them in
order and stops before the first ``post`` one unless told it is safe; ``check``
refuses a database that misses a ``pre`` one, which the installed code needs.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import metadata
from pathlib import Path
from typing import Literal

from procrastinate import schema as procrastinate_schema

from imgsvc import db, errors

_LOCK_KEY = 0x696D6773  # "imgs"
_MIGRATION_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")
_QUEUE_MIGRATION_NAME = re.compile(r"(\d{2})\.(\d{2})\.(\d{2})_(\d{2})_(?:(pre|post)_)?[a-z0-9_]+\.sql")

#: The procrastinate version every imgsvc release pinned before the record of its
#: migrations existed: a database without that record has this version's schema.
BASELINE = (3, 10, 0)

# The migrator's own bookkeeping lives here rather than in a numbered file: it must
# exist before the first file is applied, and before procrastinate's migrations are.
_CREATE_RECORD = """
CREATE TABLE IF NOT EXISTS imgsvc_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE imgsvc_migrations IS 'Schema files applied by imgsvc migrate.';
CREATE TABLE IF NOT EXISTS imgsvc_procrastinate_migrations (
    name        text PRIMARY KEY,
    how         text NOT NULL CHECK (how IN ('schema', 'migration', 'inferred')),
    by_version  text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE imgsvc_procrastinate_migrations IS
    'procrastinate migration files whose changes the database has: applied as a file '
    '(migration), part of the schema procrastinate by_version created (schema), or '
    'assumed for a database made before this record existed (inferred).';
"""

Phase = Literal["pre", "post"]


@dataclasses.dataclass(frozen=True, slots=True)
class QueueMigration:
    """One of procrastinate's migration files."""

    name: str
    version: tuple[int, int, int]
    phase: Phase
    path: Path


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    """What ``apply`` did: the files applied, and the post-migrations left waiting."""

    applied: list[str]
    waiting: list[str]


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaVersion:
    """Where a database's schema stands: the last imgsvc file and procrastinate
    migration it has, and the migrations this code knows that it has not."""

    imgsvc: int
    procrastinate: str
    pending: list[str]


def migration_files() -> list[tuple[int, Path]]:
    """The numbered schema files, in order."""
    found = []
    for path in db.sql_dir().iterdir():
        match = _MIGRATION_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def queue_migrations(folder: Path | None = None) -> list[QueueMigration]:
    """The migration files the installed procrastinate ships, in order."""
    folder = folder or Path(procrastinate_schema.SchemaManager.get_migrations_path())
    found = []
    for path in folder.iterdir():
        match = _QUEUE_MIGRATION_NAME.fullmatch(path.name)
        if match:
            major, minor, patch, _, phase = match.groups()
            version = (int(major), int(minor), int(patch))
            found.append(QueueMigration(path.stem, version, "pre" if phase == "pre" else "post", path))
    return sorted(found, key=lambda m: m.name)


def procrastinate_version() -> str:
    """The installed procrastinate version, whose schema we apply."""
    return metadata.version("procrastinate")


async def apply(url: str, *, post: bool = False) -> Applied:
    """Bring the database to the current schema; ``post``: procrastinate's
    post-migrations too (only once no process of an older version runs)."""
    pool = await db.create_pool(url, max_size=1)
    try:
        async with db.translated(), pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            try:
                return await _apply(conn, post=post)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await pool.close()


async def _apply(conn: db.Connection, *, post: bool) -> Applied:
    applied: list[str] = []
    fresh = await conn.fetchval("SELECT to_regclass('procrastinate_jobs')") is None
    if fresh:
        await conn.execute(procrastinate_schema.SchemaManager.get_schema())
        applied.append(f"procrastinate {procrastinate_version()}")
    await conn.execute(_CREATE_RECORD)
    await _record_unrecorded(conn, "schema" if fresh else "inferred")
    done = await _queue_done(conn)
    waiting: list[str] = []
    for migration in queue_migrations():
        if migration.name in done:
            continue
        if waiting or (migration.phase == "post" and not post):
            waiting.append(migration.name)  # nothing is applied past a held-back post-migration
            continue
        async with conn.transaction():
            await conn.execute(migration.path.read_text())
            await conn.execute(
                "INSERT INTO imgsvc_procrastinate_migrations (name, how, by_version) "
                "VALUES ($1, 'migration', $2)",
                migration.name,
                procrastinate_version(),
            )
        applied.append(f"procrastinate {migration.name}")
    done_files = {r["version"] for r in await conn.fetch("SELECT version FROM imgsvc_migrations")}
    for version, path in migration_files():
        if version in done_files:
            continue
        async with conn.transaction():
            await conn.execute(path.read_text())
            await conn.execute(
                "INSERT INTO imgsvc_migrations (version, name) VALUES ($1, $2)", version, path.name
            )
        applied.append(path.name)
    return Applied(applied=applied, waiting=waiting)


async def _record_unrecorded(conn: db.Connection, how: Literal["schema", "inferred"]) -> None:
    """Record what procrastinate's schema holds on a database with no record yet: all it
    ships when its schema was just created, the baseline's migrations when inferred."""
    if await conn.fetchval("SELECT count(*) FROM imgsvc_procrastinate_migrations"):
        return
    if how == "schema":
        names, by = [m.name for m in queue_migrations()], procrastinate_version()
    else:
        names = [m.name for m in queue_migrations() if m.version <= BASELINE]
        by = ".".join(map(str, BASELINE))
    await conn.executemany(
        "INSERT INTO imgsvc_procrastinate_migrations (name, how, by_version) VALUES ($1, $2, $3)",
        [(name, how, by) for name in names],
    )


async def _queue_done(conn: db.Connection) -> set[str]:
    return {r["name"] for r in await conn.fetch("SELECT name FROM imgsvc_procrastinate_migrations")}


async def require_current(url: str) -> None:
    """Raise SchemaError unless the database at ``url`` is fully migrated."""
    pool = await db.create_pool(url, max_size=1)
    try:
        await check(pool)
    finally:
        await pool.close()


_RUN = "run `imgsvc migrate` (or start with --migrate)"


async def check(pool: db.Pool) -> None:
    """Raise SchemaError unless every schema file, and every procrastinate
    pre-migration the installed version ships, has been applied."""
    async with db.translated(), pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('imgsvc_migrations')") is None:
            raise errors.SchemaError(f"the database has no imgsvc schema: {_RUN}")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM imgsvc_migrations")}
        has_queue = await conn.fetchval("SELECT to_regclass('procrastinate_jobs')") is not None
        recorded = await conn.fetchval("SELECT to_regclass('imgsvc_procrastinate_migrations')") is not None
        queue_done = await _queue_done(conn) if recorded else set()
    missing = [path.name for version, path in migration_files() if version not in done]
    if missing or not has_queue or not queue_done:
        what = (
            ", ".join(missing)
            if missing
            else "procrastinate's schema"
            if not has_queue
            else "the record of procrastinate's migrations"
        )
        raise errors.SchemaError(f"the database schema is not current (missing {what}): {_RUN}")
    behind = [m for m in queue_migrations() if m.name not in queue_done]
    needed = [m.name for m in behind if m.phase == "pre"]
    if needed:
        held = [m.name for m in behind if m.phase == "post" and m.name < needed[0]]
        how = (
            f"`imgsvc migrate --post` once no older imgsvc process runs (it waits on {held[0]})"
            if held
            else "`imgsvc migrate`"
        )
        raise errors.SchemaError(
            f"the database is behind procrastinate {procrastinate_version()} "
            f"(missing {', '.join(needed)}): run {how}"
        )


async def schema_version(pool: db.Pool) -> SchemaVersion:
    """The database's schema version, and what this code knows that it lacks."""
    async with db.translated(), pool.acquire() as conn:
        done: set[int] = set()
        if await conn.fetchval("SELECT to_regclass('imgsvc_migrations')") is not None:
            done = {r["version"] for r in await conn.fetch("SELECT version FROM imgsvc_migrations")}
        queue_done: set[str] = set()
        if await conn.fetchval("SELECT to_regclass('imgsvc_procrastinate_migrations')") is not None:
            queue_done = await _queue_done(conn)
    pending = [m.name for m in queue_migrations() if m.name not in queue_done]
    pending += [path.name for version, path in migration_files() if version not in done]
    return SchemaVersion(
        imgsvc=max(done, default=0),
        procrastinate=max(queue_done, default=""),
        pending=pending,
    )

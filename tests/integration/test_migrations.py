"""Upgrades: an older database, imgsvc's or procrastinate's, migrated forward ends
with the same catalog as a fresh one, and the code refuses a database behind it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from pathlib import Path

import asyncpg
import pytest
from procrastinate import schema

from imgsvc import db, errors, localdb, migrate
from tests import conftest, servers

# The imgsvc_migrations table as the releases before the procrastinate record made it.
_PREVIOUS_RECORD = """
CREATE TABLE imgsvc_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE imgsvc_migrations IS 'Schema files applied by imgsvc migrate.';
"""

#: What the comparison reads from pg_catalog: each kind of object, by a stable key.
_CATALOG = {
    "tables": """
        SELECT c.relname, c.relkind::text, coalesce(obj_description(c.oid, 'pg_class'), '')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')""",
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, coalesce(column_default, ''),
               is_nullable, coalesce(col_description(format('%I', table_name)::regclass,
                                                     ordinal_position::int), '')
        FROM information_schema.columns WHERE table_schema = 'public'""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "constraints": """
        SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal""",
    "types": """
        SELECT t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        WHERE t.typnamespace = 'public'::regnamespace GROUP BY t.typname""",
}

Catalog = dict[str, set[tuple[str, ...]]]


async def catalog(url: str) -> Catalog:
    """The schema of the database at ``url``: every object of each kind _CATALOG reads."""
    conn = await asyncpg.connect(url)
    try:
        return {
            kind: {tuple(str(v) for v in row) for row in await conn.fetch(query)}
            for kind, query in _CATALOG.items()
        }
    finally:
        await conn.close()


def differences(got: Catalog, expected: Catalog) -> list[str]:
    """Each object that one catalog has and the other lacks or defines differently."""
    found = []
    for kind in _CATALOG:
        found += [f"{kind}: only in the migrated one: {row}" for row in sorted(got[kind] - expected[kind])]
        found += [f"{kind}: only in the fresh one: {row}" for row in sorted(expected[kind] - got[kind])]
    return found


Empty = Callable[[], Awaitable[str]]


@pytest.fixture
async def empty_database(postgres: localdb.LocalPostgres) -> AsyncIterator[Empty]:
    """Makes empty databases; drops them at the end."""
    made: list[str] = []

    async def make() -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        postgres.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        made.append(name)
        return postgres.url_of(name)

    yield make
    for name in made:
        postgres.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def previous_release(url: str, *, files: int, queue_upto: tuple[int, int, int] | None = None) -> None:
    """Make the database an older release would have made: procrastinate's schema (the
    baseline's, or its migrations up to ``queue_upto``), then imgsvc's first ``files``
    schema files one at a time, recorded as that release did."""
    conn = await asyncpg.connect(url)
    try:
        if queue_upto is None:
            await conn.execute(schema.SchemaManager.get_schema())
        else:
            for migration in migrate.queue_migrations():
                if migration.version <= queue_upto:
                    await conn.execute(migration.path.read_text())
        await conn.execute(_PREVIOUS_RECORD)
        for version, path in migrate.migration_files()[:files]:
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO imgsvc_migrations (version, name) VALUES ($1, $2)", version, path.name
                )
    finally:
        await conn.close()


THREE_OH = (3, 0, 0)


async def procrastinate_three_oh(url: str) -> None:
    """A database with every imgsvc file and procrastinate 3.0's schema, recorded so."""
    await previous_release(url, files=len(migrate.migration_files()), queue_upto=THREE_OH)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(migrate._CREATE_RECORD)
        await conn.executemany(
            "INSERT INTO imgsvc_procrastinate_migrations (name, how, by_version) "
            "VALUES ($1, 'schema', '3.0.0')",
            [(m.name,) for m in migrate.queue_migrations() if m.version <= THREE_OH],
        )
    finally:
        await conn.close()


async def check(url: str) -> None:
    pool = await db.create_pool(url, max_size=1)
    try:
        await migrate.check(pool)
    finally:
        await pool.close()


async def test_a_fresh_database_records_procrastinate_schema(empty_database: Empty) -> None:
    url = await empty_database()
    outcome = await migrate.apply(url)
    assert outcome.applied[0] == f"procrastinate {migrate.procrastinate_version()}"
    assert outcome.applied[1:] == [path.name for _, path in migrate.migration_files()]
    assert outcome.waiting == []
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT name, how, by_version FROM imgsvc_procrastinate_migrations")
    finally:
        await conn.close()
    shipped = [m.name for m in migrate.queue_migrations()]
    assert shipped and sorted(r["name"] for r in rows) == shipped
    assert {(r["how"], r["by_version"]) for r in rows} == {("schema", migrate.procrastinate_version())}
    await check(url)
    assert await migrate.apply(url) == migrate.Applied(applied=[], waiting=[])


@pytest.mark.parametrize(
    "files", [1, len(migrate.migration_files()) // 2, len(migrate.migration_files()) - 1]
)
async def test_a_previous_release_migrated_step_by_step_equals_a_fresh_database(
    database_url: str, empty_database: Empty, files: int
) -> None:
    old = await empty_database()
    await previous_release(old, files=files)
    with pytest.raises(errors.SchemaError, match=r"missing .*\.sql.*run `imgsvc migrate`"):
        await check(old)
    outcome = await migrate.apply(old)
    assert outcome.applied == [path.name for _, path in migrate.migration_files()[files:]]
    await check(old)
    assert differences(await catalog(old), await catalog(database_url)) == []


async def test_a_database_from_before_the_record_is_inferred_at_the_baseline(
    database_url: str, empty_database: Empty
) -> None:
    old = await empty_database()
    await previous_release(old, files=len(migrate.migration_files()))
    with pytest.raises(
        errors.SchemaError, match=r"missing the record of procrastinate's migrations.*imgsvc migrate"
    ):
        await check(old)  # the code cannot tell which procrastinate schema it has
    assert await migrate.apply(old) == migrate.Applied(applied=[], waiting=[])
    conn = await asyncpg.connect(old)
    try:
        hows = {r["how"] for r in await conn.fetch("SELECT how FROM imgsvc_procrastinate_migrations")}
    finally:
        await conn.close()
    assert hows == {"inferred"}
    await check(old)
    assert differences(await catalog(old), await catalog(database_url)) == []


async def test_an_older_procrastinate_schema_is_brought_forward_pre_then_post(
    database_url: str, empty_database: Empty
) -> None:
    """A database whose procrastinate schema is 3.0's: ``migrate`` applies the next
    pre-migration and holds back at the first post one; the code refuses to start
    while a pre-migration it needs is missing; ``--post`` applies the rest, and the
    catalog is then a fresh database's."""
    old = await empty_database()
    await procrastinate_three_oh(old)
    later = [m for m in migrate.queue_migrations() if m.version > THREE_OH]
    first_post = next(i for i, m in enumerate(later) if m.phase == "post")
    assert later[0].phase == "pre" and first_post < len(later) - 1  # the case is the one meant

    with pytest.raises(errors.SchemaError, match=r"behind procrastinate .*run `imgsvc migrate`$"):
        await check(old)
    held = await migrate.apply(old)
    assert held.applied == [f"procrastinate {m.name}" for m in later[:first_post]]
    assert held.waiting == [m.name for m in later[first_post:]]
    assert await migrate.apply(old) == migrate.Applied(applied=[], waiting=held.waiting)
    with pytest.raises(errors.SchemaError, match=rf"migrate --post` .*waits on {later[first_post].name}"):
        await check(old)  # a later pre-migration waits behind the post one

    done = await migrate.apply(old, post=True)
    assert done == migrate.Applied(
        applied=[f"procrastinate {m.name}" for m in later[first_post:]], waiting=[]
    )
    await check(old)
    assert differences(await catalog(old), await catalog(database_url)) == []


async def test_the_comparison_sees_each_kind_of_difference(database_url: str, empty_database: Empty) -> None:
    fresh = await catalog(database_url)
    other = await empty_database()
    await migrate.apply(other)
    assert differences(await catalog(other), fresh) == []
    conn = await asyncpg.connect(other)
    try:
        await conn.execute("ALTER TABLE images ALTER COLUMN error SET DEFAULT 'x'")
        await conn.execute("CREATE INDEX images_extra ON images (error)")
        await conn.execute("ALTER TABLE products ADD CONSTRAINT named_check CHECK (serial_number > -1)")
        await conn.execute(
            "CREATE OR REPLACE FUNCTION procrastinate_notify_queue_job_inserted_v1() "
            "RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END; $$"
        )
        await conn.execute("CREATE VIEW extra_view AS SELECT 1 AS one")
    finally:
        await conn.close()
    found = differences(await catalog(other), fresh)
    for kind, name in [
        ("columns", "'error'"),
        ("indexes", "images_extra"),
        ("constraints", "named_check"),
        ("functions", "procrastinate_notify_queue_job_inserted_v1"),
        ("views", "extra_view"),
        ("tables", "extra_view"),
    ]:
        assert any(
            line.startswith(f"{kind}: only in the migrated one: ") and name in line for line in found
        ), (
            kind,
            found,
        )


def test_the_command_says_its_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "imgsvc", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout == f"imgsvc {metadata.version('imgsvc')}\n"


async def test_the_commands_say_what_waits_and_refuse_a_database_behind(
    empty_database: Empty, s3: servers.S3Server, tmp_path: Path
) -> None:
    old = await empty_database()
    await procrastinate_three_oh(old)
    env = {**os.environ, **conftest.test_env(s3, tmp_path), "DATABASE_URL": old}

    def imgsvc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imgsvc", *args], env=env, capture_output=True, text=True, timeout=60
        )

    worker = imgsvc("worker")
    assert worker.returncode == 1
    assert worker.stderr.strip().splitlines()[-1].startswith("imgsvc: the database is behind procrastinate")
    assert worker.stderr.strip().endswith("run `imgsvc migrate`")
    migrated = imgsvc("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "migrate: waiting: procrastinate 03.01.00_50_post_add_heartbeat" in migrated.stdout
    assert "`imgsvc migrate --post`" in migrated.stdout
    posted = imgsvc("migrate", "--post")
    assert posted.returncode == 0 and "waiting" not in posted.stdout, posted.stdout
    assert imgsvc("migrate").stdout == "migrate: the schema is current\n"

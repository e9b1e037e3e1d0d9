"""What a stored result answers, so that no image is made twice.

Two records, in PostgreSQL: ``sources`` (per source URL, the validators it last sent
and the SHA-256 of its bytes) and ``outputs`` (per source SHA-256 and settings key,
the output made and where it is stored). An image asks the origin with the source's
validators; on a 304, or on bytes whose SHA-256 is known, it takes the stored output
instead of compressing. Bytes that are one of our outputs are never compressed again.
The records are written with the image's own (``db.record_images``), in its statement.

A stored output is reused only while its object is in the store: a record is trusted
for ``IMGSVC_REUSE_CHECK_SECONDS`` after the object was stored or last found, and
checked with a HEAD after that. A record whose object is gone is forgotten and the
output made again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import asyncpg

from imgsvc import catalog, db, models, store


@dataclasses.dataclass(frozen=True, slots=True)
class Known:
    """What was last seen at a source URL, and the output made from those bytes under
    the settings asked about, if there is one (not yet checked in the store)."""

    validators: catalog.Validators
    sha256: str
    bytes: int
    output: db.Output | None
    trusted: bool = False  # the output was known to be stored a short while ago


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    """A stored output for some source bytes. ``own``: the bytes are that output;
    ``missing``: its object is gone from the store (the bytes in hand can restore it)."""

    output: db.Output
    own: bool
    missing: bool = False


async def known_source(pool: db.Pool, url: str, settings_key: str, trust_seconds: int) -> Known | None:
    """The record of ``url``, or None if it was never fetched."""
    async with db.translated():
        row = await pool.fetchrow(db.queries()["get_source"], url, settings_key, trust_seconds)
    return None if row is None else _known(row)


async def known_sources(
    pool: db.Pool, urls: list[str], settings_key: str, trust_seconds: int
) -> dict[str, Known]:
    """The records of those of ``urls`` that were fetched before, by URL."""
    async with db.translated():
        rows = await pool.fetch(db.queries()["get_sources"], urls, settings_key, trust_seconds)
    return {row["url"]: _known(row) for row in rows}


def _known(row: asyncpg.Record) -> Known:
    output = None if row["output_key"] is None else _output(row)
    validators = catalog.Validators(row["etag"], row["last_modified"])
    return Known(validators, row["sha256"], row["bytes"], output, trusted=bool(row["trusted"]))


def _output(row: asyncpg.Record) -> db.Output:
    return db.Output(
        key=row["output_key"], url=row["output_url"], bytes_out=row["bytes_out"], width=row["width"],
        height=row["height"], format_in=row["format_in"], format_out=row["format_out"],
        quality_in=row["quality_in"], quality_out=row["quality_out"],
        kept_original=row["kept_original"], sha256=row["output_sha256"],
    )  # fmt: skip


async def forget_output(pool: db.Pool, key: str) -> None:
    """The object of an output is gone from the store: the next image makes it again."""
    async with db.translated():
        await pool.execute(db.queries()["forget_output"], key)


async def present(pool: db.Pool, storage: store.Storage, key: str) -> bool:
    """Whether the object of an output is in the store (a HEAD); if it is, its record is
    trusted again for a while."""
    if not await storage.exists(key):
        return False
    async with db.translated():
        await pool.execute(db.queries()["output_verified"], key)
    return True


class Outputs:
    """The look-up of stored outputs for a job's images (``find_outputs``), several in
    one statement: an image that asks while another image's look-up is in flight waits
    for it, and goes in the next statement with all that asked meanwhile. A lone image
    waits for nothing; images whose downloads end together share a round trip."""

    def __init__(self, pool: db.Pool, settings_key: str, trust_seconds: int, *, same: bool) -> None:
        self._pool = pool
        self._args = (settings_key, same, trust_seconds)
        self._waiting: list[tuple[str, asyncio.Future[asyncpg.Record | None]]] = []
        self._lock = asyncio.Lock()
        self.statements = 0  # statements sent, for the tests

    async def row(self, source_sha256: str) -> asyncpg.Record | None:
        """The stored output's row for these source bytes, or None."""
        mine: asyncio.Future[asyncpg.Record | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((source_sha256, mine))
        try:
            async with self._lock:
                if not mine.done():
                    await self._look_up(mine)
        except asyncio.CancelledError:
            self._waiting = [(s, f) for s, f in self._waiting if f is not mine]
            if mine.done() and not mine.cancelled():
                mine.exception()  # taken: nobody waits for it any more
            raise
        return mine.result()

    async def _look_up(self, mine: asyncio.Future[asyncpg.Record | None]) -> None:
        batch, self._waiting = self._waiting, []
        self.statements += 1
        try:
            async with db.translated():
                rows = await self._pool.fetch(
                    db.queries()["find_outputs"], json.dumps(sorted({s for s, _ in batch})), *self._args
                )
        except asyncio.CancelledError:
            # This image was cancelled; the others were not, and go in the next statement.
            self._waiting[:0] = [(s, f) for s, f in batch if f is not mine]
            raise
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        found = {row["looked_up"]: row for row in rows}
        for sha256, future in batch:
            future.set_result(found.get(sha256))


async def stored_output(
    outputs: Outputs, pool: db.Pool, storage: store.Storage, source_sha256: str
) -> Found | None:
    """The output stored for these source bytes under the settings of ``outputs`` (if it
    looks for them), or the output these bytes are; None when there is none, or its
    object is gone."""
    row = await outputs.row(source_sha256)
    if row is None:
        return None
    output = _output(row)
    if row["trusted"] or await present(pool, storage, output.key):
        return Found(output, own=row["own"])
    if row["own"]:  # the bytes in hand are that object's: it can be stored again
        return Found(output, own=True, missing=True)
    await forget_output(pool, output.key)
    return None


def reused(found: Found, reason: models.ReuseReason, saved: int) -> db.Output:
    """The output a reusing image records."""
    return dataclasses.replace(found.output, reused=reason, bytes_saved=saved)

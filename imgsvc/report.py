"""The output CSV: the input columns plus "Output Image Urls", in the input order. Pure.

A failed image leaves its slot empty, so the n-th output URL always belongs to the
n-th input URL; why it failed is in the status.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import AsyncIterable, AsyncIterator, Iterable

from imgsvc import ingest

HEADER = (*ingest.COLUMNS, "Output Image Urls")


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One product of a finished request."""

    serial: str
    name: str
    input_urls: tuple[str, ...]
    output_urls: tuple[str | None, ...]


def render_csv(rows: Iterable[Row], *, header: bool = True) -> bytes:
    """The output CSV as UTF-8 bytes, quoted wherever a value needs it; without the
    header line for the chunks after the first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(HEADER)
    for row in rows:
        writer.writerow(
            [row.serial, row.name, ",".join(row.input_urls), ",".join(url or "" for url in row.output_urls)]
        )
    return out.getvalue().encode("utf-8")


async def stream_csv(chunks: AsyncIterable[Iterable[Row]]) -> AsyncIterator[bytes]:
    """The output CSV as its rows are read: the header, then each chunk's lines."""
    yield render_csv(())
    async for chunk in chunks:
        yield render_csv(chunk, header=False)

"""The output CSV: the input columns plus "Output Image Urls", in the input order. Pure.

A failed image leaves its slot empty, so the n-th output URL always belongs to the
n-th input URL; why it failed is in the status.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterable

from imgsvc import ingest

HEADER = (*ingest.COLUMNS, "Output Image Urls")


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One product of a finished request."""

    serial: str
    name: str
    input_urls: tuple[str, ...]
    output_urls: tuple[str | None, ...]


def render_csv(rows: Iterable[Row]) -> bytes:
    """The output CSV as UTF-8 bytes, quoted wherever a value needs it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow(
            [row.serial, row.name, ",".join(row.input_urls), ",".join(url or "" for url in row.output_urls)]
        )
    return out.getvalue().encode("utf-8")

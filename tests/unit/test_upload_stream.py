"""The upload's product stream: read in slices, nothing handed out after a problem."""

from __future__ import annotations

import io

import pytest

from imgsvc import errors, ingest, upload

HEADER = "S. No.,Product Name,Input Image Urls\n"
LIMITS = ingest.Limits()


async def collect(text: str) -> list[int]:
    file = io.BytesIO(text.encode())
    return [p.serial_number async for p in upload._products(file, ingest.Reader(file, LIMITS))]


async def test_a_valid_file_streams_every_product_in_order() -> None:
    rows = "".join(f"{i},P{i},http://a.test/{i}.jpg\n" for i in range(1, 5001))
    assert await collect(HEADER + rows) == list(range(1, 5001))


async def test_problems_anywhere_raise_at_the_end_with_all_of_them() -> None:
    rows = [f"{i},P{i},http://a.test/{i}.jpg\n" for i in range(1, 5001)]
    rows[99] = "100,,http://a.test/100.jpg\n"  # line 101: in the first slice
    rows[4499] = "4500,P,ftp://a.test/x.jpg\n"  # line 4501: in the third
    rows.append("7,Again,http://a.test/7b.jpg\n")  # line 5002: serial 7 is on line 8
    handed_out: list[int] = []
    with pytest.raises(errors.CsvInvalid) as caught:
        file = io.BytesIO((HEADER + "".join(rows)).encode())
        async for product in upload._products(file, ingest.Reader(file, LIMITS)):
            handed_out.append(product.serial_number)
    assert [(p["line"], p.get("column")) for p in caught.value.problems] == [(101, 2), (4501, 3), (5002, 1)]
    assert "already used on line 8" in caught.value.problems[2]["message"]
    # The first slice had a problem: nothing of the file was handed out to be stored.
    assert handed_out == []

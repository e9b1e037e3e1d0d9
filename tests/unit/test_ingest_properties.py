"""Property tests of the CSV reader: any bytes give products or line-numbered problems."""

from __future__ import annotations

import csv
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgsvc import errors, ingest, models

LIMITS = ingest.Limits(max_rows=50, max_images=200, max_urls_per_row=10, max_problems=20)
HEADER = b"S. No.,Product Name,Input Image Urls\r\n"


def parse_or_problems(data: bytes) -> list[models.Product] | errors.CsvInvalid:
    try:
        return ingest.parse_csv(io.BytesIO(data), LIMITS)
    except errors.CsvInvalid as exc:
        return exc


def check_problems(found: errors.CsvInvalid) -> None:
    assert found.total >= len(found.problems) >= 1
    for problem in found.problems:
        assert isinstance(problem["line"], int) and problem["line"] >= 1
        assert isinstance(problem["message"], str) and problem["message"]
        assert problem.get("column") in (None, 1, 2, 3)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_any_bytes_give_products_or_numbered_problems(data: bytes) -> None:
    result = parse_or_problems(data)
    if isinstance(result, errors.CsvInvalid):
        check_problems(result)


@settings(max_examples=300)
@given(st.binary(max_size=1024))
def test_any_bytes_after_a_valid_header(data: bytes) -> None:
    result = parse_or_problems(HEADER + data)
    if isinstance(result, errors.CsvInvalid):
        check_problems(result)
    else:
        assert 1 <= len(result) <= LIMITS.max_rows


names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=40
).filter(lambda name: name.strip() != "")
urls = st.lists(
    st.from_regex(r"https?://[a-z]{1,12}\.test/[a-z0-9]{1,12}\.jpg", fullmatch=True), min_size=1, max_size=5
)


@settings(max_examples=200)
@given(st.lists(st.tuples(names, urls), min_size=1, max_size=20))
def test_what_a_csv_writer_writes_is_read_back(rows: list[tuple[str, list[str]]]) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for serial, (name, row_urls) in enumerate(rows, start=1):
        writer.writerow([f"{serial}.", name, ",".join(row_urls)])
    products = ingest.parse_csv(io.BytesIO(out.getvalue().encode()), LIMITS)
    assert [(p.serial_number, p.name, list(p.urls)) for p in products] == [
        (serial, name.strip(), row_urls) for serial, (name, row_urls) in enumerate(rows, start=1)
    ]


URL_PIECES = st.sampled_from(
    [
        "http",
        "https",
        "HTTP",
        "ftp",
        "://",
        ":",
        "/",
        "?",
        "#",
        "@",
        "[",
        "]",
        ".",
        "-",
        "_",
        "%",
        " ",
        "\t",
        "\x01",
        "a",
        "shop",
        "é",
        "0",
        "1",
        "80",
        "99999",
        "65535",
        "0x",
        "user:pw",
    ]
)


@settings(max_examples=1000)
@given(st.sampled_from(["http://", "HTTPS://", "ftp://", ""]), st.lists(URL_PIECES, max_size=12).map("".join))
def test_the_plain_url_shortcut_accepts_only_what_the_full_check_accepts(start: str, rest: str) -> None:
    url = start + rest
    if ingest.is_plain_url(url):
        assert ingest._check_url_parts(url) is None

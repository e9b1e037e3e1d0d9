"""Property tests of the CSV reader: any bytes give products or line-numbered problems."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

import pytest
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


# The other forms people write, each as a writer of one row's cells from its URLs:
# the URL list quoted with another separator, or not quoted at all (one cell a URL).
FORMS: dict[str, Callable[[list[str]], list[str]]] = {
    "comma-space": lambda row_urls: [", ".join(row_urls)],
    "line breaks": lambda row_urls: ["\n".join(row_urls)],
    "CRLF line breaks": lambda row_urls: ["\r\n".join(row_urls) + "\r\n"],
    "bars": lambda row_urls: ["|".join(row_urls)],
    "spaced bars": lambda row_urls: [" | ".join(row_urls)],
    "unquoted": lambda row_urls: list(row_urls),
}
HEADERS = st.tuples(*(st.sampled_from(names) for names in ingest.HEADER_ALIASES))
query_urls = st.lists(
    st.builds(
        "{}://{}.test{}/{}{}".format,
        st.sampled_from(["http", "https", "HTTPS"]),
        st.from_regex(r"[a-z][a-z0-9-]{0,11}", fullmatch=True),
        st.sampled_from(["", ":8080", ":1"]),
        st.from_regex(r"[a-z0-9/._-]{1,40}", fullmatch=True),
        st.sampled_from(["", "?", "?w=100&h=200", "?sig=" + "Ab9%2F~" * 60, "#top"]),
    ),
    min_size=1,
    max_size=5,
)
# csv.writer quotes a cell with a carriage return only when CR is in its line
# terminator; a name with one would be written broken with LF line ends.
names_without_cr = names.filter(lambda name: "\r" not in name)


@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=100)
@given(
    header=HEADERS,
    rows=st.lists(st.tuples(names_without_cr, query_urls), min_size=1, max_size=20),
    line_end=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
    final_newline=st.booleans(),
)
def test_each_accepted_form_is_read_back(
    form: str,
    header: tuple[str, str, str],
    rows: list[tuple[str, list[str]]],
    line_end: str,
    bom: bool,
    final_newline: bool,
) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=line_end)
    writer.writerow(header)
    lines = []  # where each row starts: a name may hold line breaks
    for serial, (name, row_urls) in enumerate(rows, start=1):
        lines.append(out.getvalue().count("\n") + 1)
        writer.writerow([str(serial), name, *FORMS[form](row_urls)])
    text = out.getvalue() if final_newline else out.getvalue().removesuffix(line_end)
    reader = ingest.Reader(io.BytesIO(("\ufeff" if bom else "").encode() + text.encode()), LIMITS)
    products = list(reader)
    reader.check()
    assert [(p.serial_number, p.name, list(p.urls)) for p in products] == [
        (serial, name.strip(), row_urls) for serial, (name, row_urls) in enumerate(rows, start=1)
    ]
    # Only an unquoted list of two or more URLs is a guess, and each such row says so.
    guessed = [
        {
            "line": line,
            "message": f"{2 + len(row_urls)} cells; the image URLs were not quoted and were read as one list",
        }
        for line, (_, row_urls) in zip(lines, rows, strict=True)
        if form == "unquoted" and len(row_urls) > 1
    ]
    assert reader.warnings.total == len(guessed)
    assert reader.warnings.items == guessed[: LIMITS.max_problems]


@settings(max_examples=200)
@given(
    rows=st.lists(st.tuples(names, query_urls), min_size=1, max_size=10),
    data=st.data(),
)
def test_a_word_among_unquoted_urls_is_refused_where_it_is(
    rows: list[tuple[str, list[str]]], data: st.DataObject
) -> None:
    bad_row = data.draw(st.integers(0, len(rows) - 1))
    word = data.draw(
        st.from_regex(r"[A-Za-z][A-Za-z ]{0,20}", fullmatch=True).filter(lambda w: w.strip() != "")
    )
    cells = list(rows[bad_row][1])
    at = data.draw(st.integers(0, len(cells)))
    cells.insert(at, word)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(ingest.COLUMNS)
    for serial, (row_name, row_cells) in enumerate(rows, start=1):
        if serial == bad_row + 1:
            line = out.getvalue().count("\n") + 1
        writer.writerow([str(serial), row_name, *(cells if serial == bad_row + 1 else row_cells)])
    found = parse_or_problems(out.getvalue().encode())
    assert isinstance(found, errors.CsvInvalid)
    assert [(p["line"], p.get("column")) for p in found.problems] == [(line, None)]
    assert f"column {at + 3} ({word.strip()!r}) is not a URL" in found.problems[0]["message"]


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

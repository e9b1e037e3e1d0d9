"""The CSV validation table: what users send, and what they are told."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from imgsvc import errors, ingest, models

HEADER = "S. No.,Product Name,Input Image Urls\n"
UNQUOTED = "the image URLs were not quoted and were read as one list"
LIMITS = ingest.Limits(max_rows=5, max_images=8, max_urls_per_row=4, max_url_length=100, max_problems=10)


def parse(text: str | bytes, limits: ingest.Limits = LIMITS) -> list[models.Product]:
    data = text.encode() if isinstance(text, str) else text
    return ingest.parse_csv(io.BytesIO(data), limits)


def problems(text: str | bytes, limits: ingest.Limits = LIMITS) -> list[dict[str, object]]:
    with pytest.raises(errors.CsvInvalid) as caught:
        parse(text, limits)
    return caught.value.problems


def test_a_valid_file_gives_products_in_order() -> None:
    products = parse(
        HEADER + '1.,Shirt,"http://a.test/1.jpg, https://a.test/2.png"\n2,Socks,http://a.test/3.webp\n'
    )
    assert [(p.serial, p.serial_number, p.name, p.urls, p.line) for p in products] == [
        ("1.", 1, "Shirt", ("http://a.test/1.jpg", "https://a.test/2.png"), 2),
        ("2", 2, "Socks", ("http://a.test/3.webp",), 3),
    ]


def test_bom_crlf_spaces_and_header_spelling_are_accepted() -> None:
    text = (
        "\ufeffs.no , PRODUCT  name,input_image_urls\r\n"
        ' 7 ,  Hat  , " http://a.test/h.jpg ,http://a.test/i.jpg "\r\n'
    )
    (product,) = parse(text.encode("utf-8"))
    assert (product.serial, product.name, product.urls) == (
        "7",
        "Hat",
        ("http://a.test/h.jpg", "http://a.test/i.jpg"),
    )


def test_quoted_names_with_commas_quotes_and_newlines() -> None:
    (product,) = parse(HEADER + '1,"Mug, ""large""\nblue",http://a.test/m.jpg\n')
    assert product.name == 'Mug, "large"\nblue'


@pytest.mark.parametrize(
    ("body", "line", "column", "words"),
    [
        ("1,Shirt\n", 2, None, "expected 3 columns, found 2"),
        (
            "1,Shirt,http://a.test/1.jpg,extra\n",
            2,
            None,
            "4 cells where 3 are expected, and column 4 ('extra')",
        ),
        ("1,Mug, large,http://a.test/1.jpg\n", 2, None, "column 3 ('large') is not a URL"),
        (
            "1,Shirt,http://a.test/1.jpg,ftp://a.test/2.jpg\n",
            2,
            3,
            "image 2 ('ftp://a.test/2.jpg'): URL scheme",
        ),
        (
            "1,Shirt,http://a.test/1.jpg,http://a.test/2 3.jpg\n",
            2,
            3,
            "image 2 ('http://a.test/2 3.jpg'): URL cont",
        ),
        ("1,Shirt,,\n", 2, 3, "no image URLs"),
        (",,\n", 2, None, "empty row"),
        ("1,,http://a.test/1.jpg\n", 2, 2, "product name is empty"),
        ("1,Shirt,\n", 2, 3, "no image URLs"),
        ("one,Shirt,http://a.test/1.jpg\n", 2, 1, "not a serial number"),
        (",Shirt,http://a.test/1.jpg\n", 2, 1, "serial number is empty"),
        ("1,Shirt,ftp://a.test/1.jpg\n", 2, 3, "scheme must be http or https, not ftp"),
        ("1,Shirt,http://a.test/a b.jpg\n", 2, 3, "spaces"),
        ("1,Shirt,not-a-url\n", 2, 3, "scheme must be http or https"),
        ("1,Shirt,http:///nohost.jpg\n", 2, 3, "no valid host"),
        ("1,Shirt,http://a.test:99999/x.jpg\n", 2, 3, "malformed"),
        ("1,Shirt,http://a.test/" + "x" * 100 + "\n", 2, 3, "the limit is 100"),
        (
            '1,Shirt,"http://a.test/1,http://a.test/2,http://a.test/3,http://a.test/4,http://a.test/5"\n',
            2,
            3,
            "5 image URLs; the limit is 4",
        ),
    ],
)
def test_each_row_problem_names_line_and_column(body: str, line: int, column: int | None, words: str) -> None:
    (problem,) = problems(HEADER + body)
    assert problem["line"] == line
    assert problem.get("column") == column
    assert words in str(problem["message"])


def test_duplicate_serials_point_at_the_first_use() -> None:
    (problem,) = problems(HEADER + "1,A,http://a.test/1\n2,B,http://a.test/2\n1.,C,http://a.test/3\n")
    assert problem["line"] == 4 and "already used on line 2" in str(problem["message"])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "the file is empty"),
        (HEADER, "no product rows"),
        ("Serial,Name\n1,A\n", "the header must be"),
        ("S. No.,Product Name,Input Image Urls,Notes\n", "found 4 columns: 'S. No.', 'Product Name', "),
        ("Serial,Name,Pictures\n1,A,http://a.test/1\n", "'Serial' is not one of S. No., S.No, Sr. No.,"),
        ("Serial,Name,Pictures\n1,A,http://a.test/1\n", "'Pictures' is not one of Input Image Urls, Image"),
        ("1,A,http://a.test/1\n", "this looks like a product row: is the header missing?"),
        ("S. No.;Product Name;Input Image Urls\n", "the cells seem to be separated by ';'"),
    ],
)
def test_file_level_problems(text: str, words: str) -> None:
    assert any(words in str(p["message"]) for p in problems(text))


def test_text_that_is_not_utf8_is_reported_by_line_and_character() -> None:
    found = problems(HEADER.encode() + b"1,Caf\xc3\xa9 \xe9,http://a.test/1.jpg\n")
    # The bad byte is the 8th character: "é" before it is two bytes but one character.
    assert found[0]["line"] == 2 and found[0]["message"] == "text is not UTF-8 (byte 0xe9 at character 8)"


def test_a_nul_character_is_a_problem_of_its_cell() -> None:
    (problem,) = problems(HEADER + "1,Sh\x00irt,http://a.test/1.jpg\n2,B,http://a.test/2.jpg\n")
    assert (problem["line"], problem["column"]) == (2, 2)
    assert problem["message"] == "the cell holds a NUL character (\\x00)"


def test_an_unclosed_quote_is_reported_where_it_opens() -> None:
    rows = "".join(f"{n},N,http://a.test/{n}.jpg\n" for n in range(3, 60))
    (problem,) = problems(HEADER + '1,S,http://a.test/1.jpg\n2,"Shirt,http://a.test/2.jpg\n' + rows)
    assert problem["line"] == 3 and "a closing quote is missing" in str(problem["message"])


def test_lines_ending_in_a_carriage_return_alone_are_named_as_such() -> None:
    (problem,) = problems(HEADER.replace("\n", "\r") + "1,A,http://a.test/1.jpg\r")
    assert problem["line"] == 1 and "carriage return alone" in str(problem["message"])


def test_a_cell_as_long_as_the_limits_allow_is_read() -> None:
    # 100 URLs of 2,000 characters: over csv's default field limit of 131,072 characters.
    urls = ",".join(f"http://a.test/{n:03}/" + "x" * 1980 for n in range(100))
    limits = ingest.Limits(max_urls_per_row=100, max_url_length=2048)
    (product,) = parse(HEADER + f'1,A,"{urls}"\n', limits)
    assert len(product.urls) == 100
    (problem,) = problems(HEADER + f'1,A,"{urls}x{urls}"\n', limits)  # twice what may be
    assert problem["line"] == 2 and "longer than 273,536 characters" in str(problem["message"])


def test_blank_lines_inside_are_errors_but_trailing_ones_are_not() -> None:
    assert len(parse(HEADER + "1,A,http://a.test/1\n\n\n")) == 1
    (problem,) = problems(HEADER + "1,A,http://a.test/1\n\n2,B,http://a.test/2\n")
    assert problem["line"] == 3 and problem["message"] == "empty line"


def test_row_and_image_limits() -> None:
    rows = "".join(f"{i},P{i},http://a.test/{i}\n" for i in range(1, 8))
    assert "more than 5 product rows" in str(problems(HEADER + rows)[-1]["message"])
    many = "".join(
        f'{i},P{i},"http://a.test/{i}a,http://a.test/{i}b,http://a.test/{i}c"\n' for i in range(1, 4)
    )
    assert "more than 8 images" in str(problems(HEADER + many)[-1]["message"])


def test_every_problem_is_counted_but_only_the_first_are_listed() -> None:
    rows = "".join(f"x{i},,\n" for i in range(40))
    with pytest.raises(errors.CsvInvalid) as caught:
        parse(HEADER + rows, ingest.Limits(max_rows=100, max_problems=10))
    assert len(caught.value.problems) == 10
    assert caught.value.total == 120  # serial, name and URLs on each of 40 rows
    assert caught.value.to_json()["problem_count"] == 120


def test_unbalanced_quote_is_a_clear_problem() -> None:
    (problem,) = problems(HEADER + '1,"Shirt,http://a.test/1\n')
    assert problem["line"] == 2 and "a closing quote is missing" in str(problem["message"])


def read(
    text: str, limits: ingest.Limits = LIMITS
) -> tuple[list[models.Product], list[dict[str, object]], int]:
    """The products of a valid file, its warnings kept and their count."""
    reader = ingest.Reader(io.BytesIO(text.encode()), limits)
    products = list(reader)
    reader.check()
    return products, reader.warnings.items, reader.warnings.total


# The names people give the columns (written out, not taken from the code under test).
HEADER_NAMES = (
    ("S. No.", "S.No", "Sr. No.", "Serial Number", "Serial No", "#", "No"),
    ("Product Name", "Product", "Name"),
    ("Input Image Urls", "Image Urls", "Images", "Input Image URL(s)"),
)
ALIASES = [
    (column, alias)
    for column, aliases in enumerate(HEADER_NAMES)
    for alias in (*aliases, aliases[0].upper().replace(" ", "_"), f" {aliases[-1].lower()} ")
]


@pytest.mark.parametrize(("column", "alias"), ALIASES)
def test_each_header_alias_is_accepted_without_a_warning(column: int, alias: str) -> None:
    header = list(ingest.COLUMNS)
    header[column] = alias
    products, warnings, _ = read(",".join(header) + "\n1,A,http://a.test/1.jpg\n")
    assert [(p.serial_number, p.name, p.urls) for p in products] == [(1, "A", ("http://a.test/1.jpg",))]
    assert warnings == []


@pytest.mark.parametrize(
    "cell",
    [
        '"http://a.test/1.jpg,http://a.test/2.jpg"',
        '"http://a.test/1.jpg, http://a.test/2.jpg"',
        '"http://a.test/1.jpg\nhttp://a.test/2.jpg"',
        '"http://a.test/1.jpg\r\n  http://a.test/2.jpg\r\n"',
        "http://a.test/1.jpg|http://a.test/2.jpg",
        "http://a.test/1.jpg | http://a.test/2.jpg",
    ],
)
def test_url_lists_split_on_commas_line_breaks_and_bars(cell: str) -> None:
    products, warnings, _ = read(HEADER + f"1,A,{cell}\n")
    assert products[0].urls == ("http://a.test/1.jpg", "http://a.test/2.jpg") and warnings == []


def test_unquoted_url_lists_are_read_as_one_list_with_a_warning_per_row() -> None:
    text = (
        "Serial Number,Product Name,Input Image Urls\n"
        "1,Shirt,http://a.test/1.jpg,http://a.test/2.jpg\n"
        "2,Socks,http://a.test/3.jpg\n"
        '3,"Mug, large",http://a.test/4.jpg, http://a.test/5.jpg,http://a.test/6.jpg?w=1&h=2\n'
    )
    products, warnings, total = read(text)
    assert [p.urls for p in products] == [
        ("http://a.test/1.jpg", "http://a.test/2.jpg"),
        ("http://a.test/3.jpg",),
        ("http://a.test/4.jpg", "http://a.test/5.jpg", "http://a.test/6.jpg?w=1&h=2"),
    ]
    assert products[2].name == "Mug, large"
    assert warnings == [
        {"line": 2, "message": "4 cells; the image URLs were not quoted and were read as one list"},
        {"line": 4, "message": "5 cells; the image URLs were not quoted and were read as one list"},
    ]
    assert total == 2


def test_a_spreadsheets_empty_padding_is_ignored_with_a_warning() -> None:
    products, warnings, _ = read("S. No.,Product Name,Input Image Urls,,\n1,A,http://a.test/1.jpg,,\n")
    assert products[0].urls == ("http://a.test/1.jpg",)
    assert warnings == [
        {"line": 1, "message": "5 header cells; the 2 empty ones at the end were ignored"},
        {"line": 2, "message": "5 cells; the empty cells beside the image URLs were ignored"},
    ]


def test_warnings_are_all_counted_but_only_the_first_are_kept() -> None:
    rows = "".join(f"{i},P{i},http://a.test/{i}a.jpg,http://a.test/{i}b.jpg\n" for i in range(1, 1001))
    products, warnings, total = read(HEADER + rows, ingest.Limits(max_problems=10))
    assert len(products) == 1000 and total == 1000
    assert [w["line"] for w in warnings] == list(range(2, 12))


def test_a_file_refused_keeps_its_problems_not_its_warnings() -> None:
    found = problems(HEADER + "1,A,http://a.test/1.jpg,http://a.test/2.jpg\n2,B,http://a.test/3.jpg,note\n")
    assert [(p["line"], p.get("column")) for p in found] == [(3, None)]
    assert "column 4 ('note') is not a URL" in str(found[0]["message"])


ROOT = Path(__file__).resolve().parents[2]


def test_the_forms_in_docs_csv_md_read_as_it_says() -> None:
    blocks = re.findall(r"```csv\n(.*?)```", (ROOT / "docs" / "csv.md").read_text(), flags=re.DOTALL)
    *accepted, ambiguous = blocks
    assert len(accepted) == 5
    for block in accepted:
        products, warnings, _ = read(block)
        assert [(p.serial, p.name, p.urls) for p in products] == [
            ("1", "Shirt", ("https://shop.test/a.jpg", "https://shop.test/b.jpg")),
            ("2", "Socks", ("https://shop.test/c.jpg",)),
        ], block
        unquoted = block.startswith("Serial Number")
        assert warnings == ([{"line": 2, "message": f"4 cells; {UNQUOTED}"}] if unquoted else []), block
    (problem,) = problems(ambiguous)
    assert problem["line"] == 2 and str(problem["message"]).startswith(
        "4 cells where 3 are expected, and column 3 ('large') is not a URL"
    )


def test_the_unquoted_example_is_read_with_its_warnings() -> None:
    products, warnings, _ = read((ROOT / "examples" / "products-unquoted.csv").read_text(), ingest.Limits())
    assert [len(p.urls) for p in products] == [2, 1, 2]
    assert warnings == [{"line": n, "message": f"4 cells; {UNQUOTED}"} for n in (2, 4)]

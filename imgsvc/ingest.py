"""CSV bytes -> validated products. Pure: no I/O beyond reading the file given.

Every problem in the file is collected with its line and column (the first
``max_problems`` are reported). ``Reader`` hands out the valid products one at a time,
so a caller can store them as they come and throw everything away if ``check()``
raises ``CsvInvalid`` at the end; ``parse_csv`` is the same as one list.

What is unambiguous is read as meant, and what had to be assumed is said: the header
names have aliases (``HEADER_ALIASES``); a URL list is separated by commas, ``|`` or
line breaks; a row whose cells after the name are all URLs is one unquoted URL list,
and earns a warning (``Reader.warnings``, the first ``max_problems`` of them kept).
Anything else, a cell that is not a URL among those, say, is still a problem.
"""

from __future__ import annotations

import array
import csv
import dataclasses
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from imgsvc import errors, models

COLUMNS = ("S. No.", "Product Name", "Input Image Urls")
#: The names each column may have in the header, matched as ``_header_key`` makes them.
HEADER_ALIASES = (
    ("S. No.", "S.No", "Sr. No.", "Serial Number", "Serial No", "#", "No"),
    ("Product Name", "Product", "Name"),
    ("Input Image Urls", "Image Urls", "Images", "Input Image URL(s)"),
)
_URL_SEPARATORS = re.compile(r"[,|\r\n]")
# What a cell that is meant as a URL starts with; a bad one is then checked as a URL.
_LOOKS_LIKE_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_SERIAL = re.compile(r"\s*(\d{1,9})\s*\.?\s*")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f]")
_HOST = re.compile(r"[A-Za-z0-9.\-\[\]:_%]+")
# The common case, checked without urlsplit (a third of the parse): scheme, a plain
# host name, an optional port from 1, then a path, query or fragment, or nothing.
_PLAIN_URL = re.compile(r"(?i:https?)://[A-Za-z0-9.\-]+(?::([1-9][0-9]{0,4}))?(?:[/?#][^\s\x00-\x1f]*)?")


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one CSV may hold."""

    max_rows: int = 100_000
    max_images: int = 500_000
    max_urls_per_row: int = 100
    max_url_length: int = 2048
    max_problems: int = 50


def _header_key(cell: str) -> str:
    """A header name without case, spaces or punctuation, but with "#" (a name of its own)."""
    return re.sub(r"[^a-z#]", "", cell.lower())


_HEADER_KEYS = tuple(frozenset(_header_key(name) for name in names) for names in HEADER_ALIASES)


def check_url(url: str, max_length: int) -> str | None:
    """Why ``url`` cannot be fetched, or None when it looks fetchable."""
    if len(url) > max_length:
        return f"URL is {len(url)} characters long; the limit is {max_length}"
    if is_plain_url(url):
        return None
    return _check_url_parts(url)


def is_plain_url(url: str) -> bool:
    """True for a URL of the common shape, which ``check_url`` accepts without parsing."""
    plain = _PLAIN_URL.fullmatch(url)
    return plain is not None and (plain.group(1) is None or int(plain.group(1)) <= 65535)


def _check_url_parts(url: str) -> str | None:
    if _SPACE_OR_CONTROL.search(url):
        return "URL contains spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "URL is malformed"
    if parts.scheme.lower() not in ("http", "https"):
        shown = parts.scheme or "none"
        return f"URL scheme must be http or https, not {shown}"
    if not parts.hostname or not _HOST.fullmatch(parts.hostname):
        return "URL has no valid host name"
    if port == 0:
        return "URL has port 0"
    return None


def redact_url(url: str) -> str:
    """The URL with any user name and password hidden, for responses and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"***@{host}").geturl()


def _decoded_lines(data: Iterable[bytes], problems: _Problems) -> Iterator[str]:
    for number, raw in enumerate(data, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            character = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
            byte = raw[exc.start]
            problems.add(number, None, f"text is not UTF-8 (byte 0x{byte:02x} at character {character})")
            yield raw.decode("utf-8", errors="replace")


class _Problems:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[dict[str, Any]] = []
        self.total = 0

    def add(self, line: int, column: int | None, message: str) -> None:
        self.total += 1
        if len(self.items) < self.limit:
            item: dict[str, Any] = {"line": line}
            if column is not None:
                item["column"] = column
                item["column_name"] = COLUMNS[column - 1]
            item["message"] = message
            self.items.append(item)

    def sorted(self) -> list[dict[str, Any]]:
        """The problems kept, by line and column (duplicate serial numbers are found last)."""
        return sorted(self.items, key=lambda item: (item["line"], item.get("column", 0)))


class _Warnings:
    """What was assumed to read the file, by line: all counted, the first ``limit`` kept,
    so that a large file read the same way throughout gets a bounded answer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[dict[str, Any]] = []
        self.total = 0

    def add(self, line: int, message: str) -> None:
        self.total += 1
        if len(self.items) < self.limit:
            self.items.append({"line": line, "message": message})


class Reader:
    """Reads a CSV (an iterable of byte lines) product by product, keeping only what
    the checks need: the problems, the counts and each serial number as an 8-byte
    integer. Iterate it to get the valid products in order, then call ``check()``,
    which raises CsvInvalid when the file had any problem."""

    def __init__(self, data: Iterable[bytes], limits: Limits) -> None:
        self._data = data
        self.limits = limits
        self.problems = _Problems(limits.max_problems)
        self.warnings = _Warnings(limits.max_problems)
        self.products = 0
        self.images = 0
        self.done = False  # True once the file has been read to its end
        # Serial number << 32 | line, one per row with a valid serial number:
        # duplicates are found by sorting, at the end.
        self._serials = array.array("q")

    def __iter__(self) -> Iterator[models.Product]:
        limits, problems = self.limits, self.problems
        # csv's default cap on a field (131,072 characters) is below the longest valid URL
        # cell; the cap is the process's, and every reader here wants the same one.
        csv.field_size_limit(max(csv.field_size_limit(), longest_cell(limits)))
        reader = csv.reader(_decoded_lines(self._data, problems), strict=True, skipinitialspace=True)
        header_done = False
        blank_lines: list[int] = []
        last_line = 0
        try:
            for row in reader:
                line = last_line + 1
                last_line = reader.line_num
                if not header_done:
                    header_done = True
                    _check_header(row, line, problems, self.warnings)
                    continue
                if not row:
                    blank_lines.append(line)
                    continue
                for blank in blank_lines:
                    problems.add(blank, None, "empty line")
                blank_lines.clear()
                if self.products >= limits.max_rows:
                    problems.add(line, None, f"more than {limits.max_rows} product rows (the limit)")
                    break
                product = _check_row(row, line, limits, problems, self.warnings, self._serials)
                if product is None:
                    continue
                self.products += 1
                self.images += len(product.urls)
                if self.images > limits.max_images:
                    problems.add(line, 3, f"more than {limits.max_images} images in the file (the limit)")
                    break
                yield product
        except csv.Error as exc:
            problems.add(last_line + 1, None, _malformed(str(exc), limits))
        if not header_done and problems.total == 0:
            problems.add(1, None, "the file is empty; expected the header " + ",".join(COLUMNS))
        elif not self.products and problems.total == 0:
            problems.add(max(last_line, 1), None, "the file has a header but no product rows")
        self._check_duplicates()
        self.done = True

    def _check_duplicates(self) -> None:
        previous, first_line = -1, 0
        for key in sorted(self._serials):
            number, line = key >> 32, key & 0xFFFFFFFF
            if number == previous:
                self.problems.add(line, 1, f"serial number {number} is already used on line {first_line}")
            else:
                previous, first_line = number, line
        self._serials = array.array("q")

    def check(self) -> None:
        """Raise CsvInvalid if the file, read to its end, had any problem."""
        if self.problems.total:
            raise errors.CsvInvalid(self.problems.sorted(), self.problems.total)


def parse_csv(data: Iterable[bytes], limits: Limits) -> list[models.Product]:
    """Read a whole CSV into products, or raise CsvInvalid."""
    reader = Reader(data, limits)
    products = list(reader)
    reader.check()
    return products


def _check_header(row: list[str], line: int, problems: _Problems, warnings: _Warnings) -> None:
    cells = [cell.strip() for cell in row]
    padding = _empty_tail(cells)
    if padding and len(cells) - padding == len(COLUMNS):
        cells = cells[: len(COLUMNS)]
        warnings.add(line, f"{len(row)} header cells; the {padding} empty ones at the end were ignored")
    wrong = [
        (cell, names)
        for cell, keys, names in zip(cells, _HEADER_KEYS, HEADER_ALIASES, strict=False)
        if _header_key(cell) not in keys
    ]
    if len(cells) == len(COLUMNS) and not wrong:
        return
    found = ", ".join(repr(cell[:60]) for cell in cells[:8]) + (", …" if len(cells) > 8 else "")
    noun = "column" if len(cells) == 1 else "columns"
    message = f"the header must be {','.join(COLUMNS)!r} or aliases of those names; " + (
        f"found {len(cells)} {noun}: {found}" if cells else "found an empty line"
    )
    if cells and _SERIAL.fullmatch(cells[0]):
        message += "; this looks like a product row: is the header missing?"
    elif len(cells) == 1 and ";" in cells[0]:
        message += "; the cells seem to be separated by ';': separate them with commas"
    elif len(cells) == len(COLUMNS):
        message += "".join(f"; {cell[:60]!r} is not one of {', '.join(names)}" for cell, names in wrong)
    problems.add(line, None, message)


def _empty_tail(cells: list[str]) -> int:
    """How many cells at the end are empty (a spreadsheet pads short rows so)."""
    count = 0
    for cell in reversed(cells):
        if cell:
            break
        count += 1
    return count


def longest_cell(limits: Limits) -> int:
    """The longest cell read: every URL of a row at its longest, with room for a comma
    and some spaces or line breaks around each, and 64 KiB more."""
    return limits.max_urls_per_row * (limits.max_url_length + 32) + 64 * 1024


def _malformed(error: str, limits: Limits) -> str:
    """What csv's complaint about a record means, said at the record's first line."""
    if "field larger than field limit" in error:
        return (
            f"a cell here is longer than {longest_cell(limits):,} characters, the room for "
            f"{limits.max_urls_per_row} URLs of {limits.max_url_length:,} characters "
            "(IMGSVC_MAX_URLS_PER_ROW, IMGSVC_MAX_URL_LENGTH); a quote opened and never closed "
            "runs on like this"
        )
    if "unexpected end of data" in error:
        return "a quoted cell that starts in this row never ends: a closing quote is missing"
    if "new-line character seen in unquoted field" in error:
        return "a line ends in a carriage return alone; save the file with LF or CRLF line ends"
    return f"malformed CSV: {error}"


def _check_row(
    row: list[str],
    line: int,
    limits: Limits,
    problems: _Problems,
    warnings: _Warnings,
    serials: array.array[int],
) -> models.Product | None:
    cells = [cell.strip() for cell in row]
    if not any(cells):
        problems.add(line, None, "empty row")
        return None
    if len(cells) < len(COLUMNS):
        problems.add(line, None, f"expected {len(COLUMNS)} columns, found {len(cells)}")
        return None
    if len(cells) > len(COLUMNS):
        joined = _joined_url_cells(cells, line, problems, warnings)
        if joined is None:
            return None
        cells = [*cells[:2], joined]
    serial, name, url_cell = cells
    before = problems.total
    for column, cell in enumerate(cells, start=1):
        if "\x00" in cell:  # PostgreSQL's text cannot hold it; nor can a product name
            problems.add(line, column, "the cell holds a NUL character (\\x00)")
    if problems.total != before:
        return None
    serial_number = None
    match = _SERIAL.fullmatch(serial)
    if not serial:
        problems.add(line, 1, "the serial number is empty")
    elif match is None:
        shown = serial[:200]
        problems.add(line, 1, f"{shown!r} is not a serial number (expected a whole number like 1 or 1.)")
    else:
        serial_number = int(match.group(1))
        serials.append(serial_number << 32 | line)
    if not name:
        problems.add(line, 2, "the product name is empty")
    plain = "|" not in url_cell and "\n" not in url_cell and "\r" not in url_cell
    pieces = url_cell.split(",") if plain else _URL_SEPARATORS.split(url_cell)  # the first is faster
    urls = tuple(piece.strip() for piece in pieces if piece.strip())
    if not urls:
        problems.add(line, 3, "no image URLs")
    elif len(urls) > limits.max_urls_per_row:
        problems.add(line, 3, f"{len(urls)} image URLs; the limit is {limits.max_urls_per_row} a row")
    for position, url in enumerate(urls, start=1):
        reason = check_url(url, limits.max_url_length)
        if reason is not None:
            problems.add(line, 3, f"image {position} ({url[:200]!r}): {reason}")
    if problems.total != before or serial_number is None:
        return None
    return models.Product(line=line, serial=serial, serial_number=serial_number, name=name, urls=urls)


def _joined_url_cells(cells: list[str], line: int, problems: _Problems, warnings: _Warnings) -> str | None:
    """The cells after the name of a row with too many, as one URL list when every one
    of them is a URL or empty (an unquoted list, or a spreadsheet's padding); else None,
    with the problem: a cell that is not a URL there makes the row ambiguous."""
    extra = cells[2:]
    for column, cell in enumerate(extra, start=3):
        if cell and not _LOOKS_LIKE_URL.match(cell):
            problems.add(
                line,
                None,
                f"{len(cells)} cells where {len(COLUMNS)} are expected, and column {column} "
                f"({cell[:200]!r}) is not a URL, so the row cannot be read as one unquoted URL list; "
                "quote the product name when it holds a comma, and the image URLs cell when it holds several",
            )
            return None
    if sum(1 for cell in extra if cell) > 1:
        warnings.add(line, f"{len(cells)} cells; the image URLs were not quoted and were read as one list")
    else:
        warnings.add(line, f"{len(cells)} cells; the empty cells beside the image URLs were ignored")
    return ",".join(extra)

"""What the HTTP answers share: every JSON body's shape, declared once as a frozen
dataclass (openapi.py generates the document's schemas from them), the JSON written
from a shape, and whether the caller is a browser.

A field is always present in the JSON, null when its type allows None, unless it is
marked ``OMIT``: then a None leaves the key out. The schemas list every other field
in ``required`` and forbid undeclared keys, so a new field is a change to these
classes, seen by the tests, never a column that slips through.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from typing import Annotated, Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse

from imgsvc import models


@dataclasses.dataclass(frozen=True, slots=True)
class Schema:
    """JSON Schema keywords added to a field's generated schema (a format, a range, words)."""

    keywords: dict[str, Any]


#: Marks a field whose key is left out, not null, when its value is None.
OMIT = object()

_UUID = Schema({"format": "uuid"})
_TIME = Schema({"format": "date-time"})
_COUNT = Schema({"minimum": 0})

Uuid = Annotated[str, _UUID]
Time = Annotated[str | None, _TIME]
Count = Annotated[int, _COUNT]
Owner = Annotated[
    str | None,
    Schema(
        {
            "description": "The name of the API key that uploaded the request (IMGSVC_API_KEYS);"
            " null without API keys, and for requests made before owners were kept."
        }
    ),
]


_T = typing.TypeVar("_T")


@typing.dataclass_transform(frozen_default=True, kw_only_default=True)
def body(cls: type[_T]) -> type[_T]:
    """The decorator of every shape: a frozen, keyword-only dataclass with slots."""
    return dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)


# --- errors -------------------------------------------------------------------------


@body
class Error:
    """Every refusal and failure: a code and a message for a person."""

    error: Annotated[str, Schema({"description": "A code, e.g. invalid_csv."})]
    message: Annotated[str, Schema({"description": "What was wrong, in words."})]


@body
class Problem:
    """One problem of a CSV: its line and, when it is one cell's, the column."""

    line: Annotated[int, Schema({"minimum": 1})]
    column: Annotated[int | None, OMIT, Schema({"minimum": 1, "maximum": 3})] = None
    column_name: Annotated[str | None, OMIT] = None
    message: str


@body
class CsvError:
    """A CSV refused over its problems (the first ones, and how many in all)."""

    error: str
    message: str
    problem_count: int
    problems: list[Problem]


# --- upload and requests ------------------------------------------------------------


@body
class CsvWarning:
    """What was assumed to read one line of a CSV that was accepted."""

    line: Annotated[int, Schema({"minimum": 1})]
    message: Annotated[
        str,
        Schema({"description": "What was found and how it was read, e.g. the image URLs were not quoted."}),
    ]


@body
class Accepted:
    """POST /upload's 202: the request stored and queued, and what reading its CSV assumed."""

    request_id: Uuid
    status: Literal["queued"]
    products: int
    images: int
    status_url: str
    warning_count: Annotated[int, Schema({"minimum": 0, "description": "Every warning, listed or not."})]
    warnings: Annotated[
        list[CsvWarning], Schema({"description": "The first IMGSVC_MAX_PROBLEMS warnings, by line."})
    ]


@body
class Counts:
    """A request's images by status, with their total (the names are models.COUNTS)."""

    total: Count
    queued: Count
    processing: Count
    done: Count
    failed: Count
    cancelled: Count

    @classmethod
    def of(cls, row: typing.Mapping[str, Any]) -> Counts:
        """The counts in a row that has a column for each."""
        return cls(**{name: row[name] for name in models.COUNTS})


@body
class Reuse:
    """How a request's done images were made: compressed now, or reused."""

    compressed: Count
    reused: Count
    bytes_saved: Annotated[int, Schema({"minimum": 0})]
    reprocess: Annotated[bool, Schema({"description": "Sent with reprocess=true: nothing reused."})]


@body
class Image:
    """One image of a product, as its row in the images table has it."""

    position: int
    input_url: str
    status: models.ImageStatus
    output_url: str | None
    error: str | None
    bytes_in: int | None
    bytes_out: int | None
    width: int | None
    height: int | None
    format_in: str | None
    format_out: str | None
    quality_in: int | None
    quality_out: int | None
    kept_original: bool | None
    attempts: int
    reused: Annotated[
        models.ReuseReason | None,
        Schema({"description": "Why no new output was made (a stored one answered), or null."}),
    ]
    bytes_saved: Annotated[
        int | None, Schema({"description": "Bytes not downloaded and not stored thanks to the reuse."})
    ]


@body
class Product:
    """One product of a request, with its images in order."""

    serial: str
    name: str
    position: int
    images: list[Image]


@body
class Webhook:
    """The delivery of a request's webhook event."""

    event_id: str
    state: models.DeliveryState
    attempts: int
    last_status: int | None
    last_error: str | None
    delivered_at: Time


@body
class ProductPage:
    """Where a status answer's page of products is, and the next page's URL."""

    page: int
    per_page: int
    total_products: int
    next: str | None


@body
class RequestStatus:
    """GET /status/{request_id}: progress, counts and a page of products."""

    request_id: Uuid
    status: models.RequestStatus
    file_name: str | None
    owner: Owner
    created_at: Time
    updated_at: Time
    started_at: Time
    completed_at: Time
    counts: Counts
    reuse: Reuse
    progress: Annotated[float, Schema({"minimum": 0, "maximum": 1})]
    bytes_in: int
    bytes_out: int
    status_url: str
    output_csv_url: str | None
    output_csv_download_url: str
    webhook: Webhook | None
    products: list[Product]
    page: ProductPage


@body
class RequestSummary:
    """One request in GET /requests."""

    request_id: Uuid
    status: models.RequestStatus
    file_name: str | None
    owner: Owner
    counts: Counts
    percent: float
    created_at: Time
    completed_at: Time
    status_url: str


@body
class RequestPage:
    """Where a list of requests is, and the next page's URL."""

    page: int
    per_page: int
    total: int
    next: str | None


@body
class RequestList:
    """GET /requests: a page of requests, newest first."""

    requests: list[RequestSummary]
    page: RequestPage


@body
class Cancelled:
    """POST /requests/{request_id}/cancel's 202."""

    request_id: Uuid
    status: models.RequestStatus
    cancelled_images: int
    status_url: str


# --- the service ----------------------------------------------------------------------


@body
class Service:
    """GET / for a program: what this service is, and where its parts are."""

    service: Literal["imgsvc"]
    version: str
    upload: str
    status: str
    docs: str
    openapi: str


@body
class SchemaVersion:
    """The database's schema: its last imgsvc file and procrastinate migration, and the
    migrations this version ships that it has not applied (post-migrations wait there)."""

    imgsvc: Annotated[int, Schema({"minimum": 0, "description": "The last schema file, e.g. 11."})]
    procrastinate: Annotated[str, Schema({"description": "The last procrastinate migration applied."})]
    pending: list[str]


@body
class Health:
    """GET /healthz: alive, which version, and the database's schema version (null when
    the database does not answer)."""

    status: Literal["ok"]
    version: str
    schema: SchemaVersion | None


@body
class Checks:
    """Each part /readyz checks: "ok", or what is wrong with it."""

    database: str
    schema: str
    store: str


@body
class Ready:
    """GET /readyz: 200 when every check is ok, else 503."""

    status: Literal["ready", "not ready"]
    checks: Checks


#: Every shape, by its name in the OpenAPI components.
SHAPES: tuple[type, ...] = (
    Error,
    Problem,
    CsvError,
    CsvWarning,
    Accepted,
    Counts,
    Reuse,
    Image,
    Product,
    Webhook,
    ProductPage,
    RequestStatus,
    RequestSummary,
    RequestPage,
    RequestList,
    Cancelled,
    Service,
    SchemaVersion,
    Health,
    Checks,
    Ready,
)


# --- to JSON ------------------------------------------------------------------------


@functools.cache
def fields(shape: type) -> tuple[tuple[str, Any, bool], ...]:
    """Each field of a shape, in order: its name, its type, and whether it is OMIT."""
    hints = typing.get_type_hints(shape, include_extras=True)
    out = []
    for field in dataclasses.fields(shape):
        hint = hints[field.name]
        extras = typing.get_args(hint)[1:] if typing.get_origin(hint) is Annotated else ()
        out.append((field.name, hint, any(extra is OMIT for extra in extras)))
    return tuple(out)


def to_dict(value: Any) -> Any:
    """A shape as the plain values JSON is written from, its keys in declared order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for name, _, omit in fields(type(value)):
            item = getattr(value, name)
            if not (omit and item is None):
                out[name] = to_dict(item)
        return out
    if isinstance(value, list):
        return [to_dict(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def json(shape: Any, status_code: int = 200, **kwargs: Any) -> JSONResponse:
    """A JSON answer: a shape, or (for the OpenAPI document) a plain dict."""
    return JSONResponse(to_dict(shape), status_code=status_code, **kwargs)


def wants_html(request: Request) -> bool:
    """True for a browser: it asks for HTML before JSON."""
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept.split("text/html")[0]

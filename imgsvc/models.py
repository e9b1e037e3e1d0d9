"""Plain values shared by every layer: statuses and what a CSV row becomes."""

from __future__ import annotations

import dataclasses
import enum

# Queues and task names, shared by the task definitions and by the SQL that defers jobs.
# They are stored in procrastinate's jobs table: renaming one strands queued jobs.
IMAGE_QUEUE = "images"
PROCESS_IMAGES = "process_images"
REQUEST_QUEUE = "requests"
FINISH_REQUEST = "finish_request"
DELIVER_WEBHOOK = "deliver_webhook"
MAINTENANCE_QUEUE = "maintenance"
PRUNE_JOBS = "prune_jobs"


class RequestStatus(enum.StrEnum):
    """Where a request is; the SQL check constraint lists the same values."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True once the request will not change again."""
        return self in FINAL_REQUEST_STATUSES


FINAL_REQUEST_STATUSES = frozenset(
    {
        RequestStatus.COMPLETED,
        RequestStatus.COMPLETED_WITH_ERRORS,
        RequestStatus.FAILED,
        RequestStatus.CANCELLED,
    }
)


#: The counts a request reports, by image status, with their total.
COUNTS = ("total", "queued", "processing", "done", "failed", "cancelled")


class ImageStatus(enum.StrEnum):
    """Where one image is; the SQL check constraint lists the same values."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ReuseReason(enum.StrEnum):
    """Why a done image made no new output; the SQL check constraint lists the same values."""

    DUPLICATE = "duplicate"  # the same source URL earlier in the request did the work
    NOT_MODIFIED = "not_modified"  # the origin answered 304 to our validators
    SAME_CONTENT = "same_content"  # these bytes were compressed before, with these settings
    OWN_OUTPUT = "own_output"  # the bytes are one of our outputs: never degraded twice


class DeliveryState(enum.StrEnum):
    """Where one webhook delivery is; the SQL check constraint lists the same values."""

    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True, slots=True)
class Product:
    """One valid CSV row: the serial and name as sent, and its image URLs in order."""

    line: int
    serial: str
    serial_number: int
    name: str
    urls: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ImageTask:
    """What a worker needs to know about one image it has claimed."""

    image_id: int
    request_id: str
    serial_number: int
    position: int
    url: str
    attempts: int
    source_url: str | None = None  # the URL as matched against earlier sources
    reprocess: bool = False  # the request asked for no reuse


@dataclasses.dataclass(frozen=True, slots=True)
class Compressed:
    """The result of compressing one image."""

    data: bytes
    format_in: str
    format_out: str
    width: int
    height: int
    quality_in: int | None
    quality_out: int | None
    kept_original: bool

    @property
    def content_type(self) -> str:
        """The MIME type of ``data``."""
        return CONTENT_TYPES[self.format_out]

    @property
    def extension(self) -> str:
        """The file name extension for ``data``."""
        return EXTENSIONS[self.format_out]


CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
    "tiff": "image/tiff",
    "bmp": "image/bmp",
    "heif": "image/heif",
    "svg": "image/svg+xml",
    "ico": "image/vnd.microsoft.icon",
}
EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "gif": "gif",
    "avif": "avif",
    "tiff": "tif",
    "bmp": "bmp",
    "heif": "heic",
    "svg": "svg",
    "ico": "ico",
}

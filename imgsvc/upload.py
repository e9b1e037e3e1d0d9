"""The HTTP protocol of ``POST /upload``: the multipart body read within its limits,
the CSV handed to ``ingest`` a slice at a time and stored as it is read, the
Idempotency-Key, the webhook URL checked, and the 202 answer."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import BinaryIO

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from imgsvc import access, errors, fetch, ingest, intake, models, resources, responses, settings

logger = logging.getLogger("imgsvc.upload")


async def _limited_body(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise errors.UploadError(
                f"the upload is over the limit of {limit:,} bytes (IMGSVC_MAX_CSV_BYTES)",
                status_code=413,
                code="too_large",
            )
        yield chunk


def _csv_limits(config: settings.Settings) -> ingest.Limits:
    return ingest.Limits(
        max_rows=config.max_rows,
        max_images=config.max_images,
        max_urls_per_row=config.max_urls_per_row,
        max_url_length=config.max_url_length,
        max_problems=config.max_problems,
    )


_AS_A_FILE = "send the CSV as a file part (curl -F file=@products.csv, not file=<products.csv)"


async def upload(request: Request) -> Response:
    """POST /upload: validate a CSV, store it, queue its images; answer 202 with the id."""
    res: resources.Resources = request.app.state.resources
    config = res.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise errors.UploadError(
            "send the CSV as multipart/form-data in the field 'file'",
            status_code=415,
            code="unsupported_media_type",
        )
    # The multipart envelope adds a little to the file; allow for it.
    limit = config.max_csv_bytes + 64 * 1024
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.UploadError(
            f"the upload is {int(declared):,} bytes; the limit is "
            f"{config.max_csv_bytes:,} (IMGSVC_MAX_CSV_BYTES)",
            status_code=413,
            code="too_large",
        )
    key = _idempotency_key(request)  # refused before the body is read, not after
    parser = MultiPartParser(
        request.headers, _limited_body(request, limit), max_files=1, max_fields=8, max_part_size=8 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise errors.UploadError("send one file in the field 'file'", code="too_many_files") from exc
        if "Part exceeded maximum size" in exc.message:
            raise errors.UploadError(
                f"a form field that is not a file is over 8 KiB; {_AS_A_FILE}", code="field_too_large"
            ) from exc
        raise errors.UploadError(f"the multipart body is malformed: {exc.message}") from exc
    try:
        file = form.get("file")
        if isinstance(file, str):
            message = f"the field 'file' holds text, not a file; {_AS_A_FILE}"
            raise errors.UploadError(message, code="missing_file")
        if not isinstance(file, UploadFile):
            raise errors.UploadError("the form has no file in the field 'file'", code="missing_file")
        webhook_url = await _checked_webhook_url(form.get("webhook_url"), res)
        reprocess = _flag(form.get("reprocess"), "reprocess")
        digest = await asyncio.to_thread(_sha256, file.file)
        reader = ingest.Reader(file.file, _csv_limits(config))
        stored = await intake.insert_request(
            res.pool,
            file_name=_printable(file.filename),
            webhook_url=webhook_url,
            products=_products(file.file, reader),
            queue=models.IMAGE_QUEUE,
            task=models.PROCESS_IMAGES,
            images_per_job=config.images_per_job,
            idempotency_key=key,
            csv_sha256=digest,
            owner=access.caller_of(request).name,  # the key's name, never the key
            reprocess=reprocess,
        )
        if stored.replayed and stored.csv_sha256 == digest and not reader.done:
            # The same file as the first time: read it again (storing nothing) for the
            # same answer, warnings and all.
            await asyncio.to_thread(_read_through, file.file, reader)
    finally:
        await form.close()
    if stored.replayed and stored.csv_sha256 != digest:
        raise errors.UploadError(
            "this Idempotency-Key was already used for a different file; use a new key",
            status_code=422,
            code="idempotency_key_reused",
        )
    warnings = reader.warnings
    if not stored.replayed:
        logger.info(
            "request %s accepted: %s products, %s images, %s warnings",
            stored.request_id,
            stored.products,
            stored.images,
            warnings.total,
        )
    status_url = f"{config.base_url}/status/{stored.request_id}"
    if responses.wants_html(request):
        return RedirectResponse(f"{config.base_url}/requests/{stored.request_id}", status_code=303)
    headers = {"Location": status_url}
    if stored.replayed:
        headers["Idempotent-Replayed"] = "true"
    return responses.json(
        responses.Accepted(
            request_id=stored.request_id,
            status="queued",
            products=stored.products,
            images=stored.images,
            status_url=status_url,
            warning_count=warnings.total,
            warnings=[responses.CsvWarning(**item) for item in warnings.items],
        ),
        202,
        headers=headers,
    )


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip()
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise errors.UploadError(
            "the Idempotency-Key header must be 1 to 255 printable characters", code="invalid_idempotency_key"
        )
    return key


def _sha256(file: BinaryIO) -> str:
    """The uploaded file's SHA-256 (blocking: run it in a thread)."""
    file.seek(0)
    digest = hashlib.sha256()
    while block := file.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()


async def _products(file: BinaryIO, reader: ingest.Reader) -> AsyncIterator[models.Product]:
    """The file's valid products, read by ``reader`` (made on ``file``) in a thread a
    slice at a time so the event loop stays free, and none held longer than it takes to
    store them. After the first problem nothing more is handed out, but the file is read
    to its end so that every problem is reported; then CsvInvalid is raised, which undoes
    what was stored. The reader keeps the warnings."""
    file.seek(0)
    products = iter(reader)
    while chunk := await asyncio.to_thread(list, itertools.islice(products, _PARSE_SLICE)):
        if reader.problems.total == 0:
            for product in chunk:
                yield product
    reader.check()


_PARSE_SLICE = 2000  # products read per trip to the thread


def _flag(value: object, field: str) -> bool:
    """A true/false form field; absent is false."""
    if value is None:
        return False
    text = str(value).strip().lower() if isinstance(value, str) else ""
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise errors.UploadError(f"{field} must be true or false", status_code=422, code=f"invalid_{field}")


def _read_through(file: BinaryIO, reader: ingest.Reader) -> None:
    """Read the file to its end for what ``reader`` keeps, handing nothing out (blocking)."""
    file.seek(0)
    for _ in reader:
        pass


async def _checked_webhook_url(value: object, res: resources.Resources) -> str | None:
    """The form's webhook_url, checked as the server will use it, or None."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    config = res.settings
    reason = ingest.check_url(text, config.max_url_length)
    if reason is None and not config.webhook_secret:
        reason = "this server has no WEBHOOK_SECRET to sign webhooks with; ask its operator to set one"
    if reason is None:
        try:
            await fetch.check_destination(text, res.download_limits)
        except errors.PermanentError as exc:
            reason = exc.message
    if reason is not None:
        raise errors.UploadError(f"webhook_url: {reason}", status_code=422, code="invalid_webhook_url")
    return text


def _printable(file_name: str | None) -> str | None:
    """A file name as it may be stored and shown: no control characters (PostgreSQL's
    text takes no NUL), at most 255 characters."""
    if file_name is None:
        return None
    return "".join(c for c in file_name if c.isprintable())[:255] or None

"""Where output files go: an S3-compatible bucket, or a local folder served by the API.

Keys are made only from hex digests, the request id (a UUID) and numbers, so no user
text ever reaches a key. An output image's key is the SHA-256 of its bytes: two images
share a key only when they share every byte, and a key never changes what it holds,
so its object is sent as cacheable forever. Images stored before that layout keep
their per-request keys (``object_key``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import quote

import botocore.exceptions

from imgsvc import errors

if TYPE_CHECKING:  # the stubs are a development dependency
    import types_aiobotocore_s3


#: The Cache-Control of a content-addressed object: its bytes never change.
IMMUTABLE = "public, max-age=31536000, immutable"


def content_key(prefix: str, sha256: str, extension: str) -> str:
    """The key of an output image: the SHA-256 of its bytes."""
    key = f"img/{sha256}.{extension}"
    return f"{prefix}/{key}" if prefix else key


def object_key(prefix: str, request_id: str, serial_number: int, position: int, extension: str) -> str:
    """The key of one output image in the older, per-request layout (request, product
    serial, image position); kept for the rows that have one."""
    key = f"{request_id}/{serial_number}-{position}.{extension}"
    return f"{prefix}/{key}" if prefix else key


def csv_key(prefix: str, request_id: str) -> str:
    """The key of a request's output CSV, beside its images."""
    key = f"{request_id}/output.csv"
    return f"{prefix}/{key}" if prefix else key


class Storage(Protocol):
    """Stores bytes under a key and says where a person can open them."""

    async def put(
        self, key: str, data: bytes | IO[bytes], content_type: str, cache_control: str | None = None
    ) -> str:
        """Store ``data`` (bytes, or a seekable file read from its start) under ``key``;
        return its public URL."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``; TransientError if the store cannot say."""
        ...

    async def check(self) -> None:
        """Raise TransientError when the store cannot be reached."""
        ...


class S3Storage:
    """A bucket in S3 or any S3-compatible store, through one aioboto3 client."""

    def __init__(self, client: types_aiobotocore_s3.S3Client, bucket: str, public_url: str) -> None:
        self.client = client
        self.bucket = bucket
        self.public_url = public_url.rstrip("/")

    async def put(
        self, key: str, data: bytes | IO[bytes], content_type: str, cache_control: str | None = None
    ) -> str:
        if not isinstance(data, bytes):
            data.seek(0)
        try:
            if cache_control:
                await self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    CacheControl=cache_control,
                )
            else:
                await self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise errors.TransientError(f"the S3 store refused the upload ({code})") from exc
        except (TimeoutError, botocore.exceptions.BotoCoreError, OSError) as exc:
            raise errors.TransientError(f"the S3 store could not be reached ({type(exc).__name__})") from exc
        return f"{self.public_url}/{quote(key)}"

    async def exists(self, key: str) -> bool:
        try:
            await self.client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "error"))
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise errors.TransientError(f"the S3 store could not say whether {key} exists ({code})") from exc
        except (TimeoutError, botocore.exceptions.BotoCoreError, OSError) as exc:
            raise errors.TransientError(f"the S3 store could not be reached ({type(exc).__name__})") from exc
        return True

    async def check(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise errors.TransientError(f"bucket {self.bucket!r}: {code}") from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise errors.TransientError(f"the S3 store could not be reached ({type(exc).__name__})") from exc


def s3_public_url(bucket: str, region: str, endpoint_url: str | None) -> str:
    """The URL prefix under which the bucket's objects are found."""
    if endpoint_url:
        return f"{endpoint_url.rstrip('/')}/{bucket}"
    return f"https://{bucket}.s3.{region}.amazonaws.com"


class LocalStorage:
    """A folder on this machine; the API serves it under /files/."""

    def __init__(self, root: Path, public_url: str) -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")

    def _write(self, key: str, data: bytes | IO[bytes]) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data, bytes):
                    out.write(data)
                else:
                    data.seek(0)
                    shutil.copyfileobj(data, out)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def put(
        self, key: str, data: bytes | IO[bytes], content_type: str, cache_control: str | None = None
    ) -> str:
        try:
            await asyncio.to_thread(self._write, key, data)
        except OSError as exc:
            raise errors.TransientError(f"could not write the output file ({exc.strerror})") from exc
        return f"{self.public_url}/{quote(key)}"

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread((self.root / key).is_file)

    async def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise errors.TransientError(f"the output folder {self.root} is not writable")

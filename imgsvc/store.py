"""Where output files go: an S3-compatible bucket, or a local folder served by the API,
and the URLs people are given for them.

Keys are made only from hex digests, the request id (a UUID) and numbers, so no user
text ever reaches a key. An output image's key is the SHA-256 of its bytes: two images
share a key only when they share every byte, and a key never changes what it holds,
so its object is sent as cacheable forever. Images stored before that layout keep
the per-request keys they were stored under (``<request id>/<serial>-<position>``).

The database keeps keys; a URL is made from a key when an answer, a download or a
webhook is built (``link``): under ``IMGSVC_OUTPUT_BASE_URL`` when it is set, else the
store's own URL, and presigned for a while with ``IMGSVC_OUTPUT_URLS=presigned``. What
is kept for good (the output CSV in the bucket) takes ``lasting_link``, which never
expires.
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


#: The folder of content-addressed output images, under the prefix.
CONTENT_FOLDER = "img"


def content_key(prefix: str, sha256: str, extension: str) -> str:
    """The key of an output image: the SHA-256 of its bytes."""
    key = f"{CONTENT_FOLDER}/{sha256}.{extension}"
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

    @property
    def presigns(self) -> bool:
        """Whether ``link`` gives URLs that expire."""
        ...

    async def link(self, key: str) -> str:
        """The URL a person is given now for the object at ``key``."""
        ...

    def lasting_link(self, key: str) -> str:
        """A URL for the object at ``key`` that never expires: ``link``'s, unless that is
        presigned, then the object's own (which opens only with access to the bucket)."""
        ...


def under(base: str, key: str) -> str:
    """The URL of ``key`` under a base URL: the base, a slash, the key quoted."""
    return f"{base.rstrip('/')}/{quote(key)}"


class S3Storage:
    """A bucket in S3 or any S3-compatible store, through one aioboto3 client."""

    def __init__(
        self,
        client: types_aiobotocore_s3.S3Client,
        bucket: str,
        public_url: str,
        *,
        link_base: str | None = None,
        presign_seconds: int | None = None,
    ) -> None:
        """``public_url`` is the bucket's own URL (``s3_public_url``); ``link_base`` a
        public base for the links instead (a CDN); ``presign_seconds`` makes the links
        presigned GET URLs that open for that long."""
        self.client = client
        self.bucket = bucket
        self.public_url = public_url.rstrip("/")
        self.link_base = link_base
        self.presign_seconds = presign_seconds

    @property
    def presigns(self) -> bool:
        return self.presign_seconds is not None

    async def link(self, key: str) -> str:
        if self.presign_seconds is None:
            return self.lasting_link(key)
        try:
            url: str = await self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_seconds
            )
        except botocore.exceptions.BotoCoreError as exc:  # no credentials to sign with
            raise errors.TransientError(f"could not sign a URL ({type(exc).__name__})") from exc
        # Signing is CPU work that never waits (about 0.4 ms with botocore): a page or a
        # download signs thousands, so let the other requests run between two.
        await asyncio.sleep(0)
        return url

    def lasting_link(self, key: str) -> str:
        return under(self.link_base or self.public_url, key)

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

    def __init__(self, root: Path, public_url: str, *, link_base: str | None = None) -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")
        self.link_base = link_base

    @property
    def presigns(self) -> bool:
        return False

    async def link(self, key: str) -> str:
        return self.lasting_link(key)

    def lasting_link(self, key: str) -> str:
        return under(self.link_base or self.public_url, key)

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

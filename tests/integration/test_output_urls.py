"""Output URLs against the real S3 server (`rclone serve s3` with credentials, which
refuses every GET without a valid signature, as a private bucket does): a presigned
URL opens, the plain one is refused; and a public base replaces the bucket's URL."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from imgsvc import resources, settings, store
from tests import conftest
from tests.servers import S3Server


async def get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def test_a_presigned_url_opens_and_the_plain_one_is_refused(
    s3: S3Server, database_url: str, tmp_path: Path
) -> None:
    env = conftest.test_env(s3, tmp_path) | {
        "IMGSVC_OUTPUT_URLS": "presigned",
        "IMGSVC_PRESIGN_EXPIRES": "120",
    }
    config = settings.from_env(env)
    key = f"{uuid.uuid4()}/1-1.jpg"
    async with resources.opened(config, database_url) as res:
        stored = await res.store.put(key, b"the bytes", "image/jpeg")
        assert res.store.presigns
        signed = await res.store.link(key)
        lasting = res.store.lasting_link(key)
    assert stored == lasting == f"{s3.endpoint}/{s3.bucket}/{key}"
    query = parse_qs(urlsplit(signed).query)
    assert query["X-Amz-Expires"] == ["120"] and "X-Amz-Signature" in query
    assert s3.secret_key not in signed
    assert await get(signed) == (200, b"the bytes")
    # No signature, no bytes. AWS answers 403 AccessDenied for a private bucket; rclone
    # refuses any unsigned request, with 400 UnsupportedAlgorithm.
    status, body = await get(lasting)
    assert status in (400, 403) and b"the bytes" not in body, body
    forged = signed.replace(query["X-Amz-Signature"][0], "0" * 64)
    status, body = await get(forged)
    assert status == 403 and b"SignatureDoesNotMatch" in body, body


async def test_a_public_base_replaces_the_bucket_url_and_the_default_is_the_bucket(
    s3: S3Server, database_url: str, tmp_path: Path
) -> None:
    key = "p/0c5e/1-2.jpg"
    default = settings.from_env(conftest.test_env(s3, tmp_path))
    based = settings.from_env(
        conftest.test_env(s3, tmp_path) | {"IMGSVC_OUTPUT_BASE_URL": "https://images.example.com/"}
    )
    async with resources.opened(default, database_url) as res:
        assert not res.store.presigns
        assert await res.store.link(key) == res.store.lasting_link(key) == f"{s3.endpoint}/{s3.bucket}/{key}"
    async with resources.opened(based, database_url) as res:
        assert await res.store.link(key) == "https://images.example.com/p/0c5e/1-2.jpg"
        assert res.store.lasting_link("a b/ü.csv") == "https://images.example.com/a%20b/%C3%BC.csv"
    local = store.LocalStorage(tmp_path, "http://localhost:5000/files", link_base="https://cdn.test")
    assert await local.link(key) == "https://cdn.test/p/0c5e/1-2.jpg"

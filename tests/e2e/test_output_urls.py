"""Output URLs as a client meets them: in the status, the output CSV (downloaded and
kept in the bucket) and the webhook, with a public base, and presigned for a private
bucket, against the real S3 server (which refuses unsigned GETs)."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from imgsvc import localdb
from tests.conftest import WEBHOOK_SECRET, eventually
from tests.e2e.processes import post_csv, service_env, serving, wait_for_final
from tests.servers import ImageServer, S3Server, WebhookReceiver

HEADER = "S. No.,Product Name,Input Image Urls\n"
CDN = "https://images.example.com"


def csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


async def finished(session: aiohttp.ClientSession, status_url: str) -> dict[str, Any] | None:
    async with session.get(status_url) as response:
        body: dict[str, Any] = await response.json()
    webhook = body["webhook"]
    return body if body["output_csv_url"] and webhook and webhook["state"] == "delivered" else None


def env_for(
    database_url: str, s3: S3Server, tmp_path: Path, receiver: WebhookReceiver, hook: str, **more: str
) -> dict[str, str]:
    return service_env(database_url, s3, tmp_path, localdb.free_port()) | {
        "WEBHOOK_URL": receiver.url(hook),
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        **more,
    }


async def test_a_public_base_is_in_the_status_the_output_csv_and_the_webhook(
    database_url: str, s3: S3Server, tmp_path: Path, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    hook = f"/flaky/{uuid.uuid4().hex}/0"  # a path of its own, 200 at once
    env = env_for(database_url, s3, tmp_path, receiver, hook, IMGSVC_OUTPUT_BASE_URL=CDN + "/")
    urls = [image_server.url("/img/png_palette_trns.png"), image_server.url("/status/404")]
    body = f'{HEADER}1,Print,"{urls[0]},{urls[1]}"\n'
    with serving(env, tmp_path / "serve.log") as (base, _):
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(session, base, body.encode())
            assert status == 202, accepted
            rid = accepted["request_id"]
            final = await eventually(
                lambda: finished(session, accepted["status_url"]), what="CSV and webhook"
            )
            async with session.get(final["output_csv_download_url"]) as response:
                downloaded = csv_rows(await response.read())
    (image, missing) = final["products"][0]["images"]
    key = urlsplit(image["output_url"]).path.lstrip("/")
    assert image["output_url"] == f"{CDN}/{key}" and key.startswith("img/")
    assert missing["output_url"] is None
    assert s3.get(key)[0]  # the key under the base is the object's key in the bucket
    assert final["output_csv_url"] == f"{CDN}/{rid}/output.csv"
    stored = csv_rows(s3.get(f"{rid}/output.csv")[0])
    assert downloaded == stored
    assert stored[1][3] == f"{CDN}/{key},"  # the failed image's slot is empty
    ((_, payload),) = receiver.posts(hook)
    assert json.loads(payload)["output_csv_url"] == f"{CDN}/{rid}/output.csv"


async def test_presigned_urls_open_a_private_bucket_and_none_is_stored(
    database_url: str, s3: S3Server, tmp_path: Path, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    hook = f"/flaky/{uuid.uuid4().hex}/0"  # a path of its own, 200 at once
    env = env_for(
        database_url,
        s3,
        tmp_path,
        receiver,
        hook,
        IMGSVC_OUTPUT_URLS="presigned",
        IMGSVC_PRESIGN_EXPIRES="300",
    )
    body = f"{HEADER}1,Print,{image_server.url('/img/png_palette_trns.png')}\n"
    with serving(env, tmp_path / "serve.log") as (base, _):
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(session, base, body.encode())
            assert status == 202, accepted
            rid = accepted["request_id"]
            final = await eventually(
                lambda: finished(session, accepted["status_url"]), what="CSV and webhook"
            )
            assert final["status"] == "completed"
            download = final["output_csv_download_url"]
            assert download.endswith(f"/requests/{rid}/output.csv")
            assert final["output_csv_url"] == download  # the API's download, signed as it is read
            (image,) = final["products"][0]["images"]
            signed = image["output_url"]
            assert "X-Amz-Signature=" in signed and "X-Amz-Expires=300" in signed
            plain = signed.partition("?")[0]
            key = urlsplit(plain).path.removeprefix(f"/{s3.bucket}/")
            stored_image, _ = s3.get(key)
            async with session.get(signed) as response:
                assert response.status == 200
                assert await response.read() == stored_image
            async with session.get(plain) as response:  # the bucket is private
                assert response.status in (400, 403)
                assert await response.read() != stored_image
            async with session.get(download) as response:
                downloaded = csv_rows(await response.read())
            in_csv = downloaded[1][3]
            assert "X-Amz-Signature=" in in_csv and in_csv.partition("?")[0] == plain
            async with session.get(in_csv) as response:  # signed as it was downloaded
                assert await response.read() == stored_image
            again = await wait_for_final(session, accepted["status_url"])
            assert again["products"][0]["images"][0]["output_url"].partition("?")[0] == plain
    # Nothing that lasts holds a signature: the rows, the copy in the bucket, the event.
    stored = csv_rows(s3.get(f"{rid}/output.csv")[0])
    assert stored[1][3] == plain
    ((_, payload),) = receiver.posts(hook)
    assert json.loads(payload)["output_csv_url"] == download
    conn = await asyncpg.connect(database_url)
    try:
        saved = await conn.fetch(
            "SELECT output_url AS url FROM images UNION ALL SELECT output_csv_url FROM requests"
            " UNION ALL SELECT payload::text FROM webhook_deliveries"
        )
    finally:
        await conn.close()
    assert saved and not any("X-Amz-Signature" in (row["url"] or "") for row in saved)

"""Finishing, end to end: one CSV and one event per request, with several workers."""

from __future__ import annotations

import collections
import csv
import io
import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook

from imgsvc import localdb
from tests.conftest import WEBHOOK_SECRET, eventually
from tests.e2e.processes import (
    Process,
    assert_clean_exit,
    post_csv,
    service_env,
    wait_for_final,
    wait_until_up,
)
from tests.servers import ImageServer, S3Server, WebhookReceiver

HEADER = "S. No.,Product Name,Input Image Urls\n"


@pytest.fixture
def cluster(
    database_url: str, s3: S3Server, tmp_path: Path, receiver: WebhookReceiver
) -> Iterator[tuple[str, str]]:
    """An API without a worker, and three worker processes; yields (base URL, webhook path)."""
    port = localdb.free_port()
    hook = f"/flaky/{uuid.uuid4().hex}/0"
    env = {**service_env(database_url, s3, tmp_path, port), "WEBHOOK_URL": receiver.url(hook)}
    api = Process([sys.executable, "-m", "imgsvc", "serve", "--no-worker"], env, tmp_path / "api.log")
    workers = [
        Process([sys.executable, "-m", "imgsvc", "worker"], env, tmp_path / f"worker{n}.log")
        for n in range(3)
    ]
    base = f"http://127.0.0.1:{port}"
    wait_until_up(base, api)
    yield base, hook
    assert_clean_exit(*workers, api)


async def test_many_requests_on_several_workers_get_one_csv_and_one_event_each(
    cluster: tuple[str, str],
    database_url: str,
    image_server: ImageServer,
    s3: S3Server,
    receiver: WebhookReceiver,
) -> None:
    base, hook = cluster
    images = [image_server.url("/img/png_palette_trns.png"), image_server.url("/img/gif_animated_loop3.gif")]
    request_ids = []
    async with aiohttp.ClientSession() as session:
        for n in range(12):
            body = f'{HEADER}1,Product {n},"{images[0]},{images[1]}"\n2,Other {n},{images[n % 2]}\n'
            status, accepted = await post_csv(session, base, body.encode())
            assert status == 202
            request_ids.append(accepted["request_id"])
        finals = [await wait_for_final(session, f"{base}/status/{rid}") for rid in request_ids]

        async def all_delivered() -> bool:
            conn = await asyncpg.connect(database_url)
            try:
                delivered = await conn.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'"
                )
            finally:
                await conn.close()
            return bool(delivered == len(request_ids))

        await eventually(all_delivered, what="every request's webhook was delivered")
    assert all(f["status"] == "completed" for f in finals)
    events: collections.defaultdict[str, list[str]] = collections.defaultdict(list)
    for headers, payload in receiver.posts(hook):
        event = Webhook(WEBHOOK_SECRET).verify(payload, headers)
        events[event["request_id"]].append(headers["webhook-id"])
    assert sorted(events) == sorted(request_ids)
    assert all(len(ids) == 1 for ids in events.values()), events  # one post, one event id each
    assert len({ids[0] for ids in events.values()}) == len(request_ids)
    for rid in request_ids:
        data, _ = s3.get(f"{rid}/output.csv")
        assert len(list(csv.reader(io.StringIO(data.decode())))) == 3


async def test_output_csv_from_the_api_is_409_until_finished_then_the_csv(
    cluster: tuple[str, str], image_server: ImageServer, s3: S3Server
) -> None:
    base, _ = cluster
    slow = image_server.url(f"/flaky/{uuid.uuid4().hex}/1/png_palette_trns.png")  # retried once
    body = f'{HEADER}1,"Mug, ""large""",{slow}\n2,Crème brûlée,{image_server.url("/status/404")}\n'
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, base, body.encode())
        assert status == 202
        rid = accepted["request_id"]
        async with session.get(f"{base}/requests/{rid}/output.csv") as response:
            assert response.status == 409
            assert "still" in (await response.json())["message"]
        final = await wait_for_final(session, accepted["status_url"])
        async with session.get(final["output_csv_download_url"]) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/csv")
            served = await response.read()
        async with session.get(f"{base}/requests/{uuid.uuid4()}/output.csv") as response:
            assert response.status == 404

        async def finished() -> dict[str, Any] | None:
            async with session.get(accepted["status_url"]) as response:
                body: dict[str, Any] = await response.json()
            webhook = body["webhook"]
            return body if body["output_csv_url"] and webhook and webhook["state"] == "delivered" else None

        final = await eventually(  # the CSV in the bucket is written just after the final state
            finished, what="the output CSV was in the bucket and the webhook delivered"
        )
    assert final["status"] == "completed_with_errors"
    assert final["output_csv_url"] == f"{s3.endpoint}/{s3.bucket}/{rid}/output.csv"
    assert final["webhook"]["attempts"] == 1 and final["webhook"]["event_id"].startswith("msg_")
    stored, _ = s3.get(f"{rid}/output.csv")
    assert stored == served
    rows = list(csv.reader(io.StringIO(served.decode("utf-8"), newline="")))
    assert rows[1][:3] == ["1", 'Mug, "large"', slow]
    assert re.fullmatch(r".*/img/[0-9a-f]{64}\.png", rows[1][3])
    assert rows[2] == ["2", "Crème brûlée", image_server.url("/status/404"), ""]
    assert json.dumps(final)  # the status stays plain JSON

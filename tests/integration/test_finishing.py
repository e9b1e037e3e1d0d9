"""Finishing a request: the output CSV in the bucket, and the signed, retried webhook."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import re
import tempfile
import uuid
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imgsvc import fetch, finish, models, notify, resources
from tests.conftest import WEBHOOK_SECRET, run_until, store_request, with_settings
from tests.servers import ImageServer, S3Server, WebhookReceiver

NAMES = ['Mug, "large"', "Two\nlines", "Crème brûlée 🍮"]


async def submit(
    res: resources.Resources, products: list[tuple[str, str, tuple[str, ...]]], webhook_url: str | None = None
) -> str:
    rows = [
        models.Product(line=n + 2, serial=serial, serial_number=n + 1, name=name, urls=urls)
        for n, (serial, name, urls) in enumerate(products)
    ]
    return await store_request(res.pool, rows, webhook_url=webhook_url)


async def delivery(res: resources.Resources, rid: str) -> dict[str, Any]:
    row = await res.pool.fetchrow("SELECT * FROM webhook_deliveries WHERE request_id = $1", uuid.UUID(rid))
    assert row is not None
    return dict(row)


async def attempts(res: resources.Resources, delivery_id: int) -> list[tuple[int, int | None, str | None]]:
    rows = await res.pool.fetch(
        "SELECT attempt, http_status, error FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt",
        delivery_id,
    )
    return [(r["attempt"], r["http_status"], r["error"]) for r in rows]


SETTLED = (
    "SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE request_id = $1 "
    "AND state IN ('delivered', 'failed'))"
)


async def test_output_csv_has_every_row_and_an_empty_slot_for_a_failure(
    res: resources.Resources, database_url: str, image_server: ImageServer, s3: S3Server
) -> None:
    good = image_server.url("/img/png_palette_trns.png")
    missing = image_server.url("/status/404")
    products = [
        ("1.", NAMES[0], (good, missing, good)),
        ("2", NAMES[1], (good,)),
        ("3", NAMES[2], (missing,)),
    ]
    rid = await submit(res, products)
    await run_until(
        res, database_url, "SELECT output_csv_url IS NOT NULL FROM requests WHERE id = $1", uuid.UUID(rid)
    )
    url = await res.pool.fetchval("SELECT output_csv_url FROM requests")
    assert url == f"{s3.endpoint}/{s3.bucket}/{rid}/output.csv"
    data, content_type = s3.get(f"{rid}/output.csv")
    assert content_type.startswith("text/csv")
    read = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert read[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    assert [row[:3] for row in read[1:]] == [[s, n, ",".join(u)] for s, n, u in products]
    outputs = [row[3].split(",") for row in read[1:]]
    # One image in three slots: one output, one object, one URL (named by its bytes).
    out = outputs[0][0]
    assert re.fullmatch(rf"{s3.endpoint}/{s3.bucket}/img/[0-9a-f]{{64}}\.png", out)
    assert outputs == [[out, "", out], [out], [""]]
    assert await res.pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 0  # none configured


async def test_webhook_is_retried_until_the_receiver_accepts(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    path = f"/flaky/{uuid.uuid4().hex}/2"
    rid = await submit(
        res, [("1", "P", (image_server.url("/img/png_palette_trns.png"),))], webhook_url=receiver.url(path)
    )
    await run_until(res, database_url, SETTLED, uuid.UUID(rid))
    found = await delivery(res, rid)
    assert (found["state"], found["attempts"], found["last_status"]) == ("delivered", 3, 200)
    assert await attempts(res, found["id"]) == [
        (1, 500, "the receiver answered HTTP 500"),
        (2, 500, "the receiver answered HTTP 500"),
        (3, 200, None),
    ]
    posts = receiver.posts(path)
    assert len(posts) == 3
    assert {headers["webhook-id"] for headers, _ in posts} == {found["event_id"]}
    for headers, body in posts:
        event = Webhook(WEBHOOK_SECRET).verify(body, headers)
        assert event["type"] == "request.completed" and event["request_id"] == rid
    event = json.loads(posts[-1][1])
    assert event["status"] == "completed" and event["counts"]["done"] == 1
    assert event["output_csv_url"].endswith(f"/{rid}/output.csv")
    assert event["status_url"].endswith(f"/status/{rid}") and event["completed_at"]


async def test_a_receiver_that_always_fails_ends_failed_with_its_reason(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    rid = await submit(
        res, [("1", "P", (image_server.url("/status/404"),))], webhook_url=receiver.url("/status/500")
    )
    await run_until(res, database_url, SETTLED, uuid.UUID(rid))
    found = await delivery(res, rid)
    assert (found["state"], found["attempts"]) == ("failed", 3)
    assert found["last_error"] == "the receiver answered HTTP 500 (gave up after 3 attempts)"
    assert [a[1] for a in await attempts(res, found["id"])] == [500, 500, 500]
    # the request itself finished normally
    assert await res.pool.fetchval("SELECT status FROM requests") == "failed"


async def test_410_gone_stops_at_once(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    rid = await submit(
        res,
        [("1", "P", (image_server.url("/img/png_palette_trns.png"),))],
        webhook_url=receiver.url("/status/410"),
    )
    await run_until(res, database_url, SETTLED, uuid.UUID(rid))
    found = await delivery(res, rid)
    assert (found["state"], found["attempts"], found["last_status"]) == ("failed", 1, 410)
    assert "410 Gone" in found["last_error"]


async def test_two_jobs_for_one_delivery_post_it_once(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    path = f"/slow/{uuid.uuid4().hex}/300"  # slow enough for two attempts to overlap
    rid = await submit(
        res, [("1", "P", (image_server.url("/img/png_palette_trns.png"),))], webhook_url=receiver.url(path)
    )
    assert (await finish.cancel(res, rid))[2] == "cancelled"  # final, nothing run
    assert await finish.complete(res, rid) == "webhook queued"  # what the job does
    delivery_id = (await delivery(res, rid))["id"]
    async with res.pool.acquire() as conn:  # a second job, as a requeue racing the first
        await notify.queue_delivery(conn, delivery_id)
    await run_until(res, database_url, SETTLED, uuid.UUID(rid))
    await run_until(
        res,
        database_url,
        "SELECT NOT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE task_name = $1 AND status <> 'succeeded')",
        models.DELIVER_WEBHOOK,
    )
    assert len(receiver.posts(path)) == 1
    found = await delivery(res, rid)
    assert (found["state"], found["attempts"]) == ("delivered", 1)


async def test_a_webhook_to_a_literal_private_address_is_refused_at_delivery(
    res: resources.Resources, database_url: str, image_server: ImageServer
) -> None:
    # Private networks refused but the test servers' loopback, as in the hostile-source
    # tests; the URL (as WEBHOOK_URL would give it, unchecked at upload) is 10.0.0.1
    # once yarl, and so aiohttp, has read it.
    strict = dataclasses.replace(
        res, download_limits=fetch.Limits(allowed_networks=fetch.networks(("127.0.0.0/8",)))
    )
    rid = await submit(
        strict,
        [("1", "P", (image_server.url("/img/png_palette_trns.png"),))],
        webhook_url="http://⑩。0。0。1/hook",
    )
    await run_until(strict, database_url, SETTLED, uuid.UUID(rid))
    found = await delivery(res, rid)
    assert (found["state"], found["attempts"], found["last_status"]) == ("failed", 1, None)
    assert found["last_error"].startswith("refused to fetch 10.0.0.1: 10.0.0.1 is in a private"), found


async def test_a_hanging_receiver_is_cut_off_and_does_not_hold_up_images(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    slow = await submit(
        res, [("1", "P", (image_server.url("/img/png_palette_trns.png"),))], webhook_url=receiver.url("/hang")
    )
    await run_until(res, database_url, SETTLED, uuid.UUID(slow))
    found = await delivery(res, slow)
    assert found["state"] == "failed" and found["attempts"] == 3
    assert found["last_error"] == "the receiver did not answer within 0.5 s (gave up after 3 attempts)"
    durations = await res.pool.fetch("SELECT duration_ms FROM webhook_attempts")
    # Each attempt waited for the 0.5 s timeout (it cannot fire early), and no longer than
    # the receiver's hang would have lasted: it never answers.
    assert all(400 <= d["duration_ms"] < 10_000 for d in durations)


async def test_the_default_webhook_url_is_used_when_the_request_gives_none(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    path = f"/flaky/{uuid.uuid4().hex}/0"
    configured = with_settings(res, webhook_url=receiver.url(path))
    rid = await submit(configured, [("1", "P", (image_server.url("/img/png_palette_trns.png"),))])
    await run_until(configured, database_url, SETTLED, uuid.UUID(rid))
    assert (await delivery(res, rid))["state"] == "delivered"
    assert len(receiver.posts(path)) == 1


async def test_finishing_twice_writes_no_second_event(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    path = f"/flaky/{uuid.uuid4().hex}/0"
    rid = await submit(
        res, [("1", "P", (image_server.url("/img/png_palette_trns.png"),))], webhook_url=receiver.url(path)
    )
    await run_until(res, database_url, SETTLED, uuid.UUID(rid))
    # A crashed worker's finishing job runs again: same CSV key, no new event.
    assert await finish.complete(res, rid) == "webhook queued"
    assert await res.pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
    assert (
        await res.pool.fetchval(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = $1 AND status = 'todo'",
            models.DELIVER_WEBHOOK,
        )
        == 0
    )
    assert await notify.deliver(res, (await delivery(res, rid))["id"]) == "already settled"
    assert len(receiver.posts(path)) == 1


async def test_a_csv_spilled_to_a_temporary_file_is_uploaded_whole(
    res: resources.Resources, s3: S3Server
) -> None:
    body = b"".join(f"{n},Product {n},http://a/{n}.jpg,\r\n".encode() for n in range(20_000))
    with tempfile.SpooledTemporaryFile(max_size=64 * 1024) as spooled:
        spooled.write(body)
        spooled.rollover()  # on disk, as a large output CSV is
        await res.store.put("spilled/output.csv", spooled, "text/csv; charset=utf-8")
    assert s3.get("spilled/output.csv") == (body, "text/csv; charset=utf-8")


async def test_a_rotated_secret_signs_with_both_and_either_verifies(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    new = "whsec_" + base64.b64encode(b"the-next-webhook-secret-32bytes!").decode()
    rotating = with_settings(res, webhook_secret=(new, WEBHOOK_SECRET))
    path = f"/flaky/{uuid.uuid4().hex}/0"
    rid = await submit(
        rotating,
        [("1", "P", (image_server.url("/img/png_palette_trns.png"),))],
        webhook_url=receiver.url(path),
    )
    await run_until(rotating, database_url, SETTLED, uuid.UUID(rid))
    assert (await delivery(res, rid))["state"] == "delivered"
    [(headers, body)] = receiver.posts(path)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (WEBHOOK_SECRET, new):  # a receiver on the old secret, and one on the new
        assert Webhook(secret).verify(body, headers)["request_id"] == rid
    stranger = "whsec_" + base64.b64encode(b"a-secret-no-receiver-was-given!!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(body, headers)

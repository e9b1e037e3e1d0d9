"""Everyday operations: health, readiness, metrics, JSON logs, listing and cancelling."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

import imgsvc
from imgsvc import localdb, migrate
from tests.conftest import WEBHOOK_SECRET, eventually
from tests.e2e.processes import (
    Process,
    assert_clean_exit,
    post_csv,
    service_env,
    serving,
    wait_for_final,
)
from tests.servers import ImageServer, S3Server, WebhookReceiver

HEADER = "S. No.,Product Name,Input Image Urls\n"


@pytest.fixture
def ops(
    database_url: str, s3: S3Server, tmp_path: Path, receiver: WebhookReceiver
) -> Iterator[tuple[str, str, Process]]:
    """imgsvc serve with JSON logs, two jobs at a time, and a webhook; yields (base, hook path, process)."""
    port = localdb.free_port()
    hook = "/ok"
    env = service_env(database_url, s3, tmp_path, port) | {
        "IMGSVC_LOG_FORMAT": "json",
        "IMGSVC_WORKER_CONCURRENCY": "2",
        "IMGSVC_IMAGES_PER_JOB": "1",  # two images at a time, so that cancelling finds some queued
        "WEBHOOK_URL": receiver.url(hook),
    }
    with serving(env, tmp_path / "serve.log") as (base, process):
        yield base, hook, process


async def test_health_readiness_and_metrics(ops: tuple[str, str, Process], image_server: ImageServer) -> None:
    base, _, _ = ops
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/healthz") as response:
            health = await response.json()
            assert response.status == 200 and health == {
                "status": "ok",
                "version": imgsvc.__version__,
                "schema": {
                    "imgsvc": migrate.migration_files()[-1][0],
                    "procrastinate": migrate.queue_migrations()[-1].name,
                    "pending": [],
                },
            }
        async with session.get(base + "/readyz") as response:
            assert response.status == 200
            assert await response.json() == {
                "status": "ready",
                "checks": {"database": "ok", "schema": "ok", "store": "ok"},
            }
        status, accepted = await post_csv(
            session,
            base,
            (
                HEADER + f"1,P,{image_server.url('/img/png_palette_trns.png')}\n"
                f"2,Q,{image_server.url('/status/404')}\n"
            ).encode(),
        )
        assert status == 202
        await wait_for_final(session, accepted["status_url"])
        async with session.get(base + "/metrics") as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    assert 'imgsvc_http_requests_total{method="POST",route="/upload",status="202"} 1.0' in text
    assert 'imgsvc_http_requests_total{method="GET",route="/status/{request_id}",status="200"}' in text
    assert 'imgsvc_images_total{outcome="done"} 1.0' in text
    assert 'imgsvc_images_total{outcome="failed"} 1.0' in text
    assert 'imgsvc_stage_duration_seconds_count{stage="compress"} 1.0' in text
    assert 'imgsvc_image_bytes_total{direction="in"}' in text
    assert 'imgsvc_jobs{queue="images",state="todo"} 0.0' in text
    assert 'imgsvc_requests_finished_total{status="completed_with_errors"} 1.0' in text
    lag_count = re.search(r"^imgsvc_event_loop_lag_seconds_count (\S+)$", text, re.MULTILINE)
    assert lag_count is not None and float(lag_count.group(1)) > 0  # the API's loop is watched


async def test_cancel_stops_queued_images_and_fires_the_webhook(
    ops: tuple[str, str, Process], image_server: ImageServer, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    base, hook, process = ops
    slow = image_server.url("/slow/1500/png_palette_trns.png")
    rows = "".join(f"{n},P{n},{slow}\n" for n in range(1, 11))
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, base, (HEADER + rows).encode())
        assert status == 202
        rid = accepted["request_id"]

        async def processing() -> bool:
            async with session.get(accepted["status_url"]) as response:
                return bool((await response.json())["counts"]["processing"] >= 1)

        await eventually(processing, timeout=5, what="an image of the request was processing")
        async with session.post(f"{base}/requests/{rid}/cancel") as response:
            assert response.status == 202
            cancelled = await response.json()
        assert cancelled["cancelled_images"] >= 6 and cancelled["status"] in ("processing", "cancelled")
        final = await wait_for_final(session, accepted["status_url"])
        async with session.post(f"{base}/requests/{rid}/cancel") as response:
            assert (
                response.status == 409 and "already finished: cancelled" in (await response.json())["message"]
            )
        async with session.get(f"{base}/requests?status=cancelled") as response:
            listed = await response.json()
        async with session.get(f"{base}/requests?status=bogus") as response:
            assert response.status == 422
        events = await eventually(
            lambda: [
                json.loads(body)
                for headers, body in receiver.posts(hook)
                if json.loads(body)["request_id"] == rid
            ],
            timeout=5,
            what="the receiver got the cancelled request's webhook",
        )
    assert final["status"] == "cancelled"
    counts = final["counts"]
    assert counts["cancelled"] == cancelled["cancelled_images"]
    assert counts["done"] + counts["cancelled"] == 10 and counts["queued"] == counts["processing"] == 0
    assert [r["request_id"] for r in listed["requests"]] == [rid] and listed["page"]["total"] == 1
    assert (
        events
        and events[0]["status"] == "cancelled"
        and events[0]["counts"]["cancelled"] == counts["cancelled"]
    )
    headers, body = next((h, b) for h, b in receiver.posts(hook) if json.loads(b)["request_id"] == rid)
    Webhook(WEBHOOK_SECRET).verify(body, headers)
    lines = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    about_images = [line for line in lines if line["logger"].startswith("imgsvc.") and "image_id" in line]
    assert about_images and all(line["request_id"] == rid for line in about_images)


def test_a_worker_serves_its_own_metrics(database_url: str, s3: S3Server, tmp_path: Path) -> None:
    port = localdb.free_port()
    env = service_env(database_url, s3, tmp_path, localdb.free_port()) | {"IMGSVC_METRICS_PORT": str(port)}
    worker = Process([sys.executable, "-m", "imgsvc", "worker"], env, tmp_path / "worker.log")
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
                    text = response.read().decode()
                break
            except OSError:
                assert worker.popen.poll() is None, worker.output()
                time.sleep(0.2)
        else:
            raise AssertionError(f"the worker's metrics port did not answer in 20 s: {worker.output()}")
        assert "imgsvc_images_total" in text
    finally:
        assert_clean_exit(worker)

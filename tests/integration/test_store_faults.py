"""An S3 store that fails a share of requests (503 SlowDown, 500 InternalError): retries
get every image and every output CSV stored."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator

import pytest

from imgsvc import models, queue, resources, settings
from tests.conftest import store_request
from tests.servers import FaultyS3Proxy, ImageServer, S3Server


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultyS3Proxy]:
    server = FaultyS3Proxy(s3.endpoint, every=2)  # every other request fails
    server.start()
    yield server
    server.stop()


async def test_every_image_is_stored_through_a_failing_store(
    config: settings.Settings,
    database_url: str,
    proxy: FaultyS3Proxy,
    s3: S3Server,
    image_server: ImageServer,
) -> None:
    faulty = dataclasses.replace(config, aws_endpoint_url=proxy.endpoint, max_attempts=5)
    names = [
        "png_palette_trns.png",
        "gif_animated_loop3.gif",
        "webp_lossy_alpha_5_webp_a.webp",
        "jpeg_cmyk_adobe_no-icc.jpg",
    ] * 3
    products = [
        models.Product(
            line=n + 2,
            serial=str(n + 1),
            serial_number=n + 1,
            name=f"P{n}",
            urls=(image_server.url(f"/img/{name}?copy={n}"),),
        )
        for n, name in enumerate(names)
    ]
    async with resources.opened(faulty, database_url) as res:
        # Each image made and stored on its own (no reuse), for the proxy to break.
        rid = await store_request(res.pool, products, file_name=None, reprocess=True)
        app = queue.create_app(res.settings, database_url)
        async with app.open_async():
            for _ in range(200):
                await app.run_worker_async(
                    additional_context=queue.context(res),
                    wait=False,
                    install_signal_handlers=False,
                    concurrency=4,
                )
                if await res.pool.fetchval("SELECT output_csv_url IS NOT NULL FROM requests"):
                    break
                await asyncio.sleep(0.05)
        statuses = await res.pool.fetch(
            "SELECT status, output_key FROM images WHERE request_id = $1", uuid.UUID(rid)
        )
    assert proxy.injected >= 6, "the proxy injected too few faults to prove anything"
    assert {row["status"] for row in statuses} == {"done"}
    for row in statuses:
        data, _ = s3.get(row["output_key"])
        assert data
    assert s3.get(f"{rid}/output.csv")[0].startswith(b"S. No.,Product Name")

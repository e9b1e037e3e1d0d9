"""The one place that opens and closes what a process shares: the database pool, the
HTTP session, the S3 client, the thread pool for image work and the semaphores.
The web app's lifespan and the worker both open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import aioboto3
import aiobotocore.config
import aiohttp
from aiohttp.abc import AbstractResolver

from imgsvc import __version__, compress, db, fetch, memory, metrics, priority, settings, store


@dataclasses.dataclass(slots=True)
class Resources:
    """What the stages use, opened once per process."""

    settings: settings.Settings
    pool: db.Pool
    http: aiohttp.ClientSession
    store: store.Storage
    images: ThreadPoolExecutor
    source_slots: asyncio.Semaphore
    source_budget: memory.SourceBudget
    codec_budget: memory.MemoryBudget
    image_slots: asyncio.Semaphore
    upload_slots: asyncio.Semaphore

    download_limits: fetch.Limits
    image_limits: compress.Limits


def download_limits(config: settings.Settings) -> fetch.Limits:
    """The download limits and address rules from the settings."""
    return fetch.Limits(
        max_bytes=config.max_image_bytes,
        max_redirects=config.max_redirects,
        allow_private_networks=config.allow_private_networks,
        allowed_networks=fetch.networks(config.allowed_source_networks),
    )


def image_limits(config: settings.Settings) -> compress.Limits:
    """The image limits from the settings."""
    return compress.Limits(
        max_pixels=config.max_pixels,
        max_frames=config.max_frames,
        quality_factor=config.quality_factor,
        min_quality=config.min_quality,
        allow_svg=config.allow_svg,
        optimize_max_pixels=config.jpeg_optimize_max_pixels,
        progressive_solo_pixels=config.progressive_solo_pixels,
    )


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def opened(
    config: settings.Settings,
    database_url: str,
    *,
    pool_size: int = 10,
    resolver: AbstractResolver | None = None,
) -> AsyncIterator[Resources]:
    """Open everything; close it all on the way out."""
    compress.configure(allow_svg=config.allow_svg)
    async with contextlib.AsyncExitStack() as stack:
        pool = await db.create_pool(database_url, max_size=pool_size)
        stack.push_async_callback(pool.close)
        http = fetch.create_session(
            user_agent=f"imgsvc/{__version__} (product image compressor)",
            connect_timeout=config.connect_timeout,
            total_timeout=config.download_timeout,
            concurrency=config.download_concurrency,
            per_host=config.download_per_host,
            limits=download_limits(config),
            resolver=resolver,
        )
        stack.push_async_callback(http.close)
        output: store.Storage
        if config.aws_bucket_name:
            session = aioboto3.Session()
            client = await stack.enter_async_context(
                session.client(
                    "s3",
                    region_name=config.aws_region,
                    endpoint_url=config.aws_endpoint_url,
                    aws_access_key_id=config.aws_access_key,
                    aws_secret_access_key=config.aws_secret_key,
                    config=aiobotocore.config.AioConfig(
                        retries={"max_attempts": 3, "mode": "standard"},
                        max_pool_connections=config.upload_concurrency,
                        connect_timeout=config.connect_timeout,
                        read_timeout=60,
                        # No CRC32 trailer on every PUT (botocore's default since 1.36): not
                        # every S3-compatible store takes it, and TLS or the SigV4 payload hash
                        # already protect the body.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        # SigV4 for presigned URLs too (botocore presigns SigV2 without it,
                        # which AWS regions opened since 2014 refuse).
                        signature_version="s3v4",
                    ),
                )
            )
            output = store.S3Storage(
                client,
                config.aws_bucket_name,
                store.s3_public_url(config.aws_bucket_name, config.aws_region, config.aws_endpoint_url),
                link_base=config.output_base_url,
                presign_seconds=config.presign_seconds if config.output_urls == "presigned" else None,
            )
        else:
            config.local_storage_dir.mkdir(parents=True, exist_ok=True)
            output = store.LocalStorage(
                config.local_storage_dir, f"{config.base_url}/files", link_base=config.output_base_url
            )
        images = ThreadPoolExecutor(
            max_workers=config.image_concurrency,
            thread_name_prefix="imgsvc-image",
            initializer=priority.lower_priority,
            initargs=(config.image_nice,),
        )
        stack.callback(images.shutdown, wait=True, cancel_futures=True)
        # What start-up made (modules, the S3 client's service model, the pools: about
        # 100,000 objects) lives as long as the process. Frozen, the collector's full
        # passes skip it; each took about 20 ms of a busy event loop, and set the
        # GET /status p99 under load.
        gc.collect()
        gc.freeze()
        watcher = asyncio.get_running_loop().create_task(metrics.watch_event_loop())
        stack.push_async_callback(_stop, watcher)
        yield Resources(
            settings=config,
            pool=pool,
            http=http,
            store=output,
            images=images,
            source_slots=asyncio.Semaphore(config.download_concurrency),
            source_budget=memory.SourceBudget(config.source_memory, config.image_concurrency + 1),
            codec_budget=memory.MemoryBudget(config.image_memory, config.large_image_concurrency),
            image_slots=asyncio.Semaphore(config.image_concurrency),
            upload_slots=asyncio.Semaphore(config.upload_concurrency),
            download_limits=download_limits(config),
            image_limits=image_limits(config),
        )

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
import aiohttp
from aiohttp.abc import AbstractResolver
from botocore.config import Config

from imgsvc import __version__, compress, db, download, metrics, settings, storage


class SourceBudget:
    """Bounds the bytes of source images a process holds, from the start of their
    download to the end of their compression.

    A download starts only when what is held, plus what it is expected to bring (the
    running mean of the sources so far), fits in ``limit``, or while fewer than
    ``min_sources`` are held, so the codec threads always have one waiting and a source
    larger than the budget still gets through. Large sources therefore queue a few at a
    time and small ones many at a time: memory for the one, latency hiding for the other.

    Once a source declares its size (Content-Length, before its body is read), its
    download goes on only when that fits beside the other sources of known size, or
    while fewer than ``min_sources`` have a known size. So a burst of large sources after
    many small ones waits at its headers instead of all arriving at once; only bodies of
    undeclared length (chunked) can still pass the limit, each by at most the byte limit
    of one image. Sources of known size never wait again, and they end by themselves, so
    those that wait are always woken.
    """

    def __init__(self, limit: int, min_sources: int, first_guess: int = 0) -> None:
        self.limit = limit
        self.min_sources = max(1, min_sources)
        self.held = 0
        self.sources = 0
        self.known = 0  # sources whose size is declared or read
        self.peak = 0
        # Until a source has been seen, assume a quarter of the budget each, so that a
        # first burst of large sources does not all start at once.
        self.typical = first_guess or max(1, limit // 4)
        self._changed = asyncio.Event()

    def _fits(self) -> bool:
        return not self.limit or self.sources < self.min_sources or self.held + self.typical <= self.limit

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[SourceHold]:
        """Wait for room, then hold the expected size; the hold yielded is told the
        declared size (``expect``, which may wait) and the real one (calling it) once
        the source is in memory."""
        while not self._fits():
            self._changed.clear()
            await self._changed.wait()
        hold = SourceHold(self, self.typical)
        self._add(hold.share)
        self.sources += 1
        try:
            yield hold
        finally:
            self._add(-hold.share)
            self.sources -= 1
            if hold.known:
                self.known -= 1
            self._changed.set()

    def _add(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)
        metrics.source_bytes.set(self.held)


class SourceHold:
    """One source's place in a SourceBudget."""

    def __init__(self, budget: SourceBudget, share: int) -> None:
        self._budget = budget
        self.share = share
        self.known = False

    def _resize(self, size: int) -> None:
        budget = self._budget
        budget._add(size - self.share)
        self.share = size
        if not self.known:
            self.known = True
            budget.known += 1
        budget._changed.set()

    async def expect(self, size: int) -> None:
        """The size the source declares, before its body is read: wait until it fits
        beside the sources of known size, unless fewer than ``min_sources`` have one."""
        budget = self._budget
        while (
            budget.limit
            and budget.known >= budget.min_sources
            and budget.held - self.share + size > budget.limit
        ):
            budget._changed.clear()
            await budget._changed.wait()
        self._resize(size)

    def __call__(self, size: int) -> None:
        """The source's real size, once it is in memory."""
        budget = self._budget
        budget.typical += (size - budget.typical) // 4
        self._resize(size)


@dataclasses.dataclass(slots=True)
class Resources:
    """What the stages use, opened once per process."""

    settings: settings.Settings
    pool: db.Pool
    http: aiohttp.ClientSession
    store: storage.Storage
    images: ThreadPoolExecutor
    source_slots: asyncio.Semaphore
    source_budget: SourceBudget
    image_slots: asyncio.Semaphore
    upload_slots: asyncio.Semaphore

    download_limits: download.Limits
    image_limits: compress.Limits


def download_limits(config: settings.Settings) -> download.Limits:
    """The download limits and address rules from the settings."""
    return download.Limits(
        max_bytes=config.max_image_bytes,
        max_redirects=config.max_redirects,
        allow_private_networks=config.allow_private_networks,
        allowed_networks=download.networks(config.allowed_source_networks),
    )


def image_limits(config: settings.Settings) -> compress.Limits:
    """The image limits from the settings."""
    return compress.Limits(
        max_pixels=config.max_pixels,
        max_frames=config.max_frames,
        quality_factor=config.quality_factor,
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
    compress.configure(
        allow_svg=config.allow_svg,
        memory=config.image_memory,
        large_concurrency=config.large_image_concurrency,
    )
    async with contextlib.AsyncExitStack() as stack:
        pool = await db.create_pool(database_url, max_size=pool_size)
        stack.push_async_callback(pool.close)
        http = download.create_session(
            user_agent=f"imgsvc/{__version__} (product image compressor)",
            connect_timeout=config.connect_timeout,
            total_timeout=config.download_timeout,
            concurrency=config.download_concurrency,
            per_host=config.download_per_host,
            limits=download_limits(config),
            resolver=resolver,
        )
        stack.push_async_callback(http.close)
        store: storage.Storage
        if config.aws_bucket_name:
            session = aioboto3.Session()
            client = await stack.enter_async_context(
                session.client(
                    "s3",
                    region_name=config.aws_region,
                    endpoint_url=config.aws_endpoint_url,
                    aws_access_key_id=config.aws_access_key,
                    aws_secret_access_key=config.aws_secret_key,
                    config=Config(
                        retries={"max_attempts": 3, "mode": "standard"},
                        max_pool_connections=config.upload_concurrency,
                        connect_timeout=config.connect_timeout,
                        read_timeout=60,
                        # No CRC32 trailer on every PUT (botocore's default since 1.36): not
                        # every S3-compatible store takes it, and TLS or the SigV4 payload hash
                        # already protect the body.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                    ),
                )
            )
            store = storage.S3Storage(
                client,
                config.aws_bucket_name,
                storage.s3_public_url(config.aws_bucket_name, config.aws_region, config.aws_endpoint_url),
            )
        else:
            config.local_storage_dir.mkdir(parents=True, exist_ok=True)
            store = storage.LocalStorage(config.local_storage_dir, f"{config.base_url}/files")
        images = ThreadPoolExecutor(
            max_workers=config.image_concurrency,
            thread_name_prefix="imgsvc-image",
            initializer=compress.lower_priority,
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
            store=store,
            images=images,
            source_slots=asyncio.Semaphore(config.download_concurrency),
            source_budget=SourceBudget(config.source_memory, config.image_concurrency + 1),
            image_slots=asyncio.Semaphore(config.image_concurrency),
            upload_slots=asyncio.Semaphore(config.upload_concurrency),
            download_limits=download_limits(config),
            image_limits=image_limits(config),
        )

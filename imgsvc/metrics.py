"""Prometheus metrics, with the standard client library. Each process has its own:
the API serves them at /metrics; a standalone worker on IMGSVC_METRICS_PORT, and each
process of a worker of several on a port of its own, every sample labelled with the
process's name (``serve_worker``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

http_requests = Counter(
    "imgsvc_http_requests_total",
    "HTTP requests answered, by route and status.",
    ["method", "route", "status"],
)
http_duration = Histogram(
    "imgsvc_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    buckets=_SECONDS,
)
images = Counter(
    "imgsvc_images_total", "Images by outcome: done, failed, or retry (a transient failure).", ["outcome"]
)
images_reused = Counter(
    "imgsvc_images_reused_total",
    "Done images whose output was reused rather than made again, by why: duplicate, "
    "not_modified, same_content, own_output.",
    ["reason"],
)
image_bytes = Counter(
    "imgsvc_image_bytes_total", "Bytes of images: in (downloaded) and out (stored).", ["direction"]
)
stage_duration = Histogram(
    "imgsvc_stage_duration_seconds", "Time in each stage of an image.", ["stage"], buckets=_SECONDS
)
source_bytes = Gauge(
    "imgsvc_source_bytes", "Bytes of source images held, from their download to the end of their compression."
)
webhooks = Counter("imgsvc_webhook_deliveries_total", "Webhook attempts by outcome.", ["outcome"])
requests_finished = Counter(
    "imgsvc_requests_finished_total", "Requests that reached a final status.", ["status"]
)
jobs = Gauge(
    "imgsvc_jobs",
    "Jobs in the queue by queue and state (read from the database when scraped).",
    ["queue", "state"],
)
event_loop_lag = Histogram(
    "imgsvc_event_loop_lag_seconds",
    "How late a timer set every 0.1 s fired on this process's event loop: time the loop "
    "was held, or the process was not given a CPU. HTTP requests and the steps between "
    "an image's stages wait meanwhile; compression in its threads goes on.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

LAG_INTERVAL = 0.1


async def watch_event_loop(
    record: Callable[[float], None] = event_loop_lag.observe, interval: float = LAG_INTERVAL
) -> None:
    """Until cancelled, ``record`` how late (seconds) a timer fires every ``interval``
    seconds on the running loop; into the histogram above unless told otherwise."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        record(max(0.0, loop.time() - due))


class _Labelled:
    """The metrics of ``registry`` with a ``process`` label added to every sample."""

    def __init__(self, registry: CollectorRegistry, process: str) -> None:
        self.registry = registry
        self.process = process

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, "process": self.process})
                for sample in family.samples
            ]
            yield labelled


def serve_worker(port: int, host: str, process: str | None = None) -> None:
    """Serve this process's metrics on ``port`` in a thread; each sample labelled
    ``process`` with ``process`` if given."""
    registry = REGISTRY
    if process is not None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Labelled(REGISTRY, process))
    prometheus_client.start_http_server(port, addr=host, registry=registry)

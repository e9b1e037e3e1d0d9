"""Settings: one frozen dataclass, read from the environment once at start-up.

Each setting is declared once, as a field of ``Settings`` whose metadata holds its
``Declaration``: the environment variable (and its aliases), the parser, whether it is
a secret, and the meaning that docs/configuration.md shows. ``from_env`` reads every
field through its declaration; ``markdown_table`` writes the documentation's tables,
and a test holds the document to them (``python -m imgsvc.settings`` prints them).

Every setting of the service is read here. Elsewhere only the command-line client
reads its own defaults (IMGSVC_SERVER, IMGSVC_API_KEY, PORT), and compress leaves
glibc's MALLOC_* tunables alone when they are set. A missing or malformed value raises
``SettingsError`` naming the variable, and the command line turns it into one line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgsvc import config_parsers as p
from imgsvc import cores, errors

MIB = p.MIB
_CORES = cores.usable_cores()  # affinity and cgroup quota, not the host's count

SERVER, DATABASE, STORAGE, WEBHOOKS = "Server", "Database", "Storage", "Webhooks"
LIMITS, IMAGES, CONCURRENCY, RETRIES = "Security and limits", "Images", "Concurrency", "Retries"
TOPICS = (SERVER, DATABASE, STORAGE, WEBHOOKS, LIMITS, IMAGES, CONCURRENCY, RETRIES)


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything imgsvc can be told, with its default."""

    port: int = p.declare(5000, "PORT", SERVER, p.PORT, "HTTP port")
    host: str = p.declare(
        "127.0.0.1", "IMGSVC_HOST", SERVER, p.TEXT, "address to listen on (`0.0.0.0` in the Docker image)"
    )
    database_url: str | None = p.declare(
        None,
        "DATABASE_URL",
        DATABASE,
        p.DATABASE_URL,
        "`postgresql://…`; unset: a private cluster in `IMGSVC_DATA_DIR/pg`",
    )
    data_dir: Path = p.declare(  # noqa: RUF009 (a Path is not mutable)
        Path(".data"), "IMGSVC_DATA_DIR", DATABASE, p.PATH, "the private cluster and local output files"
    )
    public_base_url: str | None = p.declare(
        None,
        "IMGSVC_PUBLIC_BASE_URL",
        SERVER,
        p.HTTP_URL,
        "how clients reach this service, for links in responses and local file URLs",
        default_text="`http://HOST:PORT` (see below)",
    )
    log_level: str = p.declare(
        "INFO", "IMGSVC_LOG_LEVEL", SERVER, p.LOG_LEVEL, "`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`"
    )
    log_format: str = p.declare(
        "text", "IMGSVC_LOG_FORMAT", SERVER, p.LOG_FORMAT, "`text`, or `json` for one JSON object a line"
    )
    metrics_port: int | None = p.declare(
        None,
        "IMGSVC_METRICS_PORT",
        SERVER,
        p.PORT,
        "a standalone worker's Prometheus port (the API serves `/metrics` itself); with"
        " `--processes N`, `worker-1`'s, and the next ports the other processes'",
    )

    aws_region: str = p.declare(
        "us-east-1", ("AWS_REGION", "AWS_DEFAULT_REGION"), STORAGE, p.TEXT, "the bucket's region"
    )
    aws_bucket_name: str | None = p.declare(
        None,
        "AWS_BUCKET_NAME",
        STORAGE,
        p.TEXT,
        "bucket for output images; unset: the local folder, served under `/files/`",
    )
    aws_access_key: str | None = p.declare(
        None,
        ("AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
        STORAGE,
        p.TEXT,
        "the key of the credentials; set both keys or neither (one alone stops start-up);"
        " unset: boto's usual chain (instance role, `~/.aws`)",
    )
    aws_secret_key: str | None = p.declare(
        None,
        ("AWS_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
        STORAGE,
        p.TEXT,
        "the secret of the credentials, with the key. Never printed",
        secret=True,
    )
    aws_endpoint_url: str | None = p.declare(
        None, "AWS_ENDPOINT_URL", STORAGE, p.HTTP_URL, "any S3-compatible store: MinIO, R2, Ceph"
    )
    s3_prefix: str = p.declare(
        "", "IMGSVC_S3_PREFIX", STORAGE, p.S3_PREFIX, "a folder inside the bucket for all keys"
    )
    output_base_url: str | None = p.declare(
        None,
        "IMGSVC_OUTPUT_BASE_URL",
        STORAGE,
        p.HTTP_URL,
        "a public base for output image and output CSV URLs, such as a CDN in front of the"
        " bucket (`https://images.example.com`): the URL is the base, `/`, and the object's"
        " key; unset: the bucket's own URL (or `/files/` without a bucket)",
    )
    output_urls: str = p.declare(
        "public",
        "IMGSVC_OUTPUT_URLS",
        STORAGE,
        p.OUTPUT_URLS,
        "`public`: plain URLs, for a bucket (or base) anyone can read; `presigned`: for a"
        " private bucket, GET URLs signed each time the status or the output CSV download"
        " is read (see below)",
    )
    presign_seconds: int = p.declare(
        3600,
        "IMGSVC_PRESIGN_EXPIRES",
        STORAGE,
        p.PRESIGN_SECONDS,
        "with `IMGSVC_OUTPUT_URLS=presigned`, how long a signed URL opens, in seconds"
        " (S3's limit: 604800, 7 days)",
    )

    webhook_url: str | None = p.declare(
        None,
        "WEBHOOK_URL",
        WEBHOOKS,
        p.HTTP_URL,
        "where to send each finished request's event, unless the upload gives its own `webhook_url`;"
        " unset: no webhook. Receivers are checked as sources are (see below)",
    )
    webhook_secret: tuple[str, ...] = p.declare(
        (),
        "WEBHOOK_SECRET",
        WEBHOOKS,
        p.WEBHOOK_SECRETS,
        "the signing secret, `whsec_` + base64 (Standard Webhooks' form) or any other text without"
        " spaces (its UTF-8 bytes); several, space-separated, while rotating: each event is signed with"
        " every one (see below). Required with `WEBHOOK_URL`, and for uploads that give a `webhook_url`."
        " Never printed",
        secret=True,
        default_text="unset",
    )
    webhook_timeout: float = p.declare(
        10.0, "IMGSVC_WEBHOOK_TIMEOUT", WEBHOOKS, p.SECONDS, "seconds a receiver has to answer one attempt"
    )
    webhook_max_attempts: int = p.declare(
        12, "IMGSVC_WEBHOOK_MAX_ATTEMPTS", WEBHOOKS, p.COUNT, "attempts before a delivery is given up"
    )
    webhook_retry_base_seconds: float = p.declare(
        10.0,
        "IMGSVC_WEBHOOK_RETRY_BASE_SECONDS",
        WEBHOOKS,
        p.SECONDS,
        "first webhook retry delay; doubles each time up to the longest, with jitter (see below)",
    )
    webhook_retry_max_seconds: float = p.declare(
        3600.0, "IMGSVC_WEBHOOK_RETRY_MAX_SECONDS", WEBHOOKS, p.SECONDS, "longest webhook retry delay"
    )

    allow_private_networks: bool = p.declare(
        False,
        "IMGSVC_ALLOW_PRIVATE_NETWORKS",
        LIMITS,
        p.BOOL,
        "allow source URLs on private, loopback and link-local addresses (tests, local demos)",
    )
    allowed_source_networks: tuple[str, ...] = p.declare(
        (),
        "IMGSVC_ALLOWED_SOURCE_NETWORKS",
        LIMITS,
        p.NETWORKS,
        "comma-separated networks let through while the others stay refused, e.g. `10.20.0.0/16`"
        " for an internal image host or webhook receiver",
    )
    allow_svg: bool = p.declare(
        False, "IMGSVC_ALLOW_SVG", LIMITS, p.BOOL, "read SVG sources (rendered by librsvg, stored as PNG)"
    )
    api_keys: tuple[p.ApiKey, ...] = p.declare(
        (),
        "IMGSVC_API_KEYS",
        LIMITS,
        p.API_KEYS,
        "comma-separated `NAME:KEY` (a user key: it sees only the requests it made), `NAME:KEY:admin`"
        " (sees all) or a plain `KEY` (an admin key, named `key-` and 8 hex digits of its SHA-256);"
        " keys of 16 characters or more. When set, every endpoint but `/healthz` and `/readyz` needs"
        " `Authorization: Bearer <key>` (see below). Never printed",
        secret=True,
        default_text="unset",
    )
    max_csv_bytes: int = p.declare(50 * MIB, "IMGSVC_MAX_CSV_BYTES", LIMITS, p.COUNT, "largest upload")
    max_rows: int = p.declare(100_000, "IMGSVC_MAX_ROWS", LIMITS, p.COUNT, "products in one CSV")
    max_images: int = p.declare(500_000, "IMGSVC_MAX_IMAGES", LIMITS, p.COUNT, "images in one CSV")
    max_urls_per_row: int = p.declare(
        100, "IMGSVC_MAX_URLS_PER_ROW", LIMITS, p.COUNT, "images of one product"
    )
    max_url_length: int = p.declare(2048, "IMGSVC_MAX_URL_LENGTH", LIMITS, p.COUNT, "characters in one URL")
    max_problems: int = p.declare(
        50,
        "IMGSVC_MAX_PROBLEMS",
        LIMITS,
        p.COUNT,
        "CSV problems listed in an error answer, and warnings in an upload's 202 (all are counted)",
    )

    max_image_bytes: int = p.declare(
        40 * MIB,
        "IMGSVC_MAX_IMAGE_BYTES",
        LIMITS,
        p.COUNT,
        "largest source image, checked on `Content-Length` and while streaming",
    )
    max_pixels: int = p.declare(
        50_000_000,
        "IMGSVC_MAX_PIXELS",
        LIMITS,
        p.COUNT,
        "largest source image in pixels (one frame), checked from the header before decoding",
    )
    image_memory: int = p.declare(
        512 * MIB,
        "IMGSVC_IMAGE_MEMORY_MB",
        IMAGES,
        p.MEBIBYTES,
        "the codec memory (MiB) a worker may have in use at once, each image's estimated from its"
        " header (see below); one larger than this runs alone. `0` for no limit. Per `imgsvc worker`:"
        " its processes share it (see below)",
    )
    jpeg_optimize_max_pixels: int = p.declare(
        16_000_000,
        "IMGSVC_JPEG_OPTIMIZE_MAX_PIXELS",
        IMAGES,
        p.PIXELS_OR_NEVER,
        "JPEG outputs up to this many pixels get Huffman tables computed for the image"
        " (`optimize_coding`), larger ones the standard tables (see below). `0` for never, `50000000`"
        " for always",
    )
    progressive_solo_pixels: int = p.declare(
        16_000_000,
        "IMGSVC_PROGRESSIVE_SOLO_PIXELS",
        IMAGES,
        p.PIXELS_OR_NO_RULE,
        "progressive JPEG sources of more pixels than this are compressed one at a time, while other"
        " images still run beside them (see below). `0` for no such rule",
    )
    max_frames: int = p.declare(
        300, "IMGSVC_MAX_FRAMES", LIMITS, p.COUNT, "most frames in an animated GIF or WebP"
    )
    connect_timeout: float = p.declare(
        10.0,
        "IMGSVC_CONNECT_TIMEOUT",
        LIMITS,
        p.SECONDS,
        "seconds to connect to a source or to the S3 store; a source may also pause at most three"
        " times this between two reads",
    )
    download_timeout: float = p.declare(
        60.0, "IMGSVC_DOWNLOAD_TIMEOUT", LIMITS, p.SECONDS, "seconds for a whole download"
    )
    max_redirects: int = p.declare(
        5, "IMGSVC_MAX_REDIRECTS", LIMITS, p.REDIRECTS, "redirects followed, each one checked again"
    )

    quality_factor: float = p.declare(
        0.5, "IMGSVC_QUALITY_FACTOR", IMAGES, p.FRACTION, "output quality as a share of the source's"
    )
    reuse_check_seconds: int = p.declare(
        3600,
        "IMGSVC_REUSE_CHECK_SECONDS",
        IMAGES,
        p.SECONDS_OR_ALWAYS,
        "a stored output known to be in the store (stored, or found by a HEAD) longer ago than"
        " this is checked with a HEAD before it is reused",
    )
    min_quality: int = p.declare(
        30,
        "IMGSVC_MIN_QUALITY",
        IMAGES,
        p.QUALITY,
        "no JPEG, WebP or AVIF is encoded below this quality (or below its source's, if lower): "
        "an image of ours re-encoded elsewhere and sent again is not halved without end",
    )
    download_concurrency: int = p.declare(
        8 * _CORES,
        "IMGSVC_DOWNLOAD_CONCURRENCY",
        CONCURRENCY,
        p.COUNT,
        "images a worker holds from the start of their download to the end of their"
        " compression (downloading, or downloaded and waiting for the codec), by count. Raise it"
        " when sources are slow to answer",
        default_text="8 × usable cores",
    )
    source_memory: int = p.declare(
        16 * MIB,
        "IMGSVC_SOURCE_MEMORY_MB",
        CONCURRENCY,
        p.MEBIBYTES,
        "the same images' source bytes (MiB), by size (see below). `0` for no limit (the count alone)",
    )
    download_per_host: int = p.declare(
        8, "IMGSVC_DOWNLOAD_PER_HOST", CONCURRENCY, p.COUNT, "downloads at once from one host"
    )
    image_concurrency: int = p.declare(
        _CORES + 1,
        "IMGSVC_IMAGE_CONCURRENCY",
        CONCURRENCY,
        p.COUNT,
        "images decoded and encoded at once (the threads of the image pool); one more than the"
        " cores fills compress()'s single-threaded moments (see below)",
        default_text="usable cores + 1",
    )
    large_image_concurrency: int = p.declare(
        _CORES,
        "IMGSVC_LARGE_IMAGE_CONCURRENCY",
        CONCURRENCY,
        p.COUNT,
        "of those, photos over 4 MP at once, so the extra thread never holds a large one (memory)",
        default_text="usable cores",
    )
    image_nice: int = p.declare(
        10,
        "IMGSVC_IMAGE_NICE",
        CONCURRENCY,
        p.NICE_STEPS,
        "how many nice levels lower the image threads (and the libvips threads they start) run than"
        " the worker's event loop (see below); `0` to keep them level (0-19)",
    )
    worker_session_nice: int = p.declare(
        0,
        "IMGSVC_WORKER_SESSION_NICE",
        CONCURRENCY,
        p.NICE_STEPS,
        "where Linux schedules by session (autogroup), how many levels lower a worker that runs no"
        " API and leads its own session puts that session (0-19; see below)",
    )
    upload_concurrency: int = p.declare(
        16, "IMGSVC_UPLOAD_CONCURRENCY", CONCURRENCY, p.COUNT, "uploads at once"
    )
    worker_concurrency: int = p.declare(
        8, "IMGSVC_WORKER_CONCURRENCY", CONCURRENCY, p.COUNT, "jobs a worker runs at once"
    )
    images_per_job: int = p.declare(
        16,
        "IMGSVC_IMAGES_PER_JOB",
        CONCURRENCY,
        p.COUNT,
        "images of a request carried by one job (fewer queue round trips per image; each image"
        " still has its own attempts)",
    )
    record_linger_seconds: float = p.declare(
        0.1,
        "IMGSVC_RECORD_LINGER_SECONDS",
        CONCURRENCY,
        p.SECONDS_OR_NONE,
        "how long a finished image waits for the rest of its job, to be recorded with them in"
        " one statement (a status read lags by at most this; 0: each on its own unless another"
        " statement is in flight)",
    )
    max_attempts: int = p.declare(
        5,
        "IMGSVC_MAX_ATTEMPTS",
        RETRIES,
        p.COUNT,
        "tries of an image before a transient failure is final",
    )
    retry_base_seconds: float = p.declare(
        2.0,
        "IMGSVC_RETRY_BASE_SECONDS",
        RETRIES,
        p.SECONDS,
        "first retry delay; doubles each time, with jitter",
    )
    retry_max_seconds: float = p.declare(
        300.0, "IMGSVC_RETRY_MAX_SECONDS", RETRIES, p.SECONDS, "longest retry delay"
    )
    stalled_seconds: float = p.declare(
        60.0,
        "IMGSVC_STALLED_SECONDS",
        RETRIES,
        p.SECONDS,
        "a worker silent this long is taken as dead, and its jobs run again",
    )
    job_retention_hours: int = p.declare(
        168,
        "IMGSVC_JOB_RETENTION_HOURS",
        RETRIES,
        p.HOURS,
        "jobs that ended failed, aborted (interrupted at a stop) or cancelled stay in"
        " `procrastinate_jobs` this long, then a maintenance task deletes them; jobs that succeed"
        " are deleted as they finish",
    )
    shutdown_seconds: float = p.declare(
        20.0,
        "IMGSVC_SHUTDOWN_SECONDS",
        RETRIES,
        p.SECONDS,
        "on SIGTERM, how long running images may take before they are queued again",
    )

    @property
    def local_storage_dir(self) -> Path:
        """Where output images go when no bucket is configured."""
        return self.data_dir / "output"

    @property
    def base_url(self) -> str:
        """The public root of this service, for links in responses."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = "localhost" if self.host in ("0.0.0.0", "127.0.0.1", "::", "::1") else self.host  # noqa: S104
        if ":" in host:  # another IPv6 address
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def declarations() -> list[tuple[dataclasses.Field[Any], p.Declaration]]:
    """Every field of ``Settings`` with its declaration, in the order of the fields."""
    declared = []
    for field in dataclasses.fields(Settings):
        declaration = field.metadata.get("declaration")
        assert isinstance(declaration, p.Declaration), field.name
        declared.append((field, declaration))
    return declared


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment, or raise SettingsError."""
    env = os.environ if env is None else env
    found = {field.name: declared.read(env) for field, declared in declarations()}
    config = Settings(**{name: value[1] for name, value in found.items() if value is not None})
    if config.webhook_url and not config.webhook_secret:
        raise errors.SettingsError(
            "WEBHOOK_SECRET", "is required when WEBHOOK_URL is set: webhooks are signed"
        )
    if (config.aws_access_key is None) != (config.aws_secret_key is None):
        missing = "AWS_SECRET_KEY" if config.aws_secret_key is None else "AWS_ACCESS_KEY"
        raise errors.SettingsError(missing, "set both the access key and the secret key, or neither")
    if config.output_urls == "presigned":
        if not config.aws_bucket_name:
            raise errors.SettingsError(
                "IMGSVC_OUTPUT_URLS", "presigned URLs need a bucket: set AWS_BUCKET_NAME"
            )
        if config.output_base_url:
            raise errors.SettingsError(
                "IMGSVC_OUTPUT_BASE_URL",
                "cannot be used with IMGSVC_OUTPUT_URLS=presigned: a presigned URL is the bucket's own",
            )
    return config


def markdown_table(topic: str) -> str:
    """One topic's table, as docs/configuration.md has it."""
    rows = [
        declared.markdown_row(field.default) for field, declared in declarations() if declared.topic == topic
    ]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows]) + "\n"


if __name__ == "__main__":
    print("\n".join(f"## {topic}\n\n{markdown_table(topic)}" for topic in TOPICS), end="")

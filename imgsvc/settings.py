"""Settings: one frozen dataclass, read from the environment once at start-up.

Every setting of the service is read here. Elsewhere only the command-line client
reads its own defaults (IMGSVC_SERVER, IMGSVC_API_KEY, PORT), and compress leaves
glibc's MALLOC_* tunables alone when they are set. A missing or malformed value raises
``SettingsError`` naming the variable, and the command line turns it into one line.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from imgsvc import errors

T = TypeVar("T")

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything imgsvc can be told, with its default."""

    port: int = 5000
    host: str = "127.0.0.1"
    database_url: str | None = None
    data_dir: Path = Path(".data")
    public_base_url: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int | None = None

    aws_region: str = "us-east-1"
    aws_bucket_name: str | None = None
    aws_access_key: str | None = None
    aws_secret_key: str | None = None
    aws_endpoint_url: str | None = None
    s3_prefix: str = ""

    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_timeout: float = 10.0
    webhook_max_attempts: int = 12
    webhook_retry_base_seconds: float = 10.0
    webhook_retry_max_seconds: float = 3600.0

    allow_private_networks: bool = False
    allowed_source_networks: tuple[str, ...] = ()
    allow_svg: bool = False
    api_keys: tuple[str, ...] = ()
    max_csv_bytes: int = 50 * MIB
    max_rows: int = 100_000
    max_images: int = 500_000
    max_urls_per_row: int = 100
    max_url_length: int = 2048
    max_problems: int = 50

    max_image_bytes: int = 40 * MIB
    max_pixels: int = 50_000_000
    image_memory: int = 512 * MIB
    jpeg_optimize_max_pixels: int = 16_000_000
    progressive_solo_pixels: int = 16_000_000
    max_frames: int = 300
    connect_timeout: float = 10.0
    download_timeout: float = 60.0
    max_redirects: int = 5

    quality_factor: float = 0.5
    # Images between the start of their download and the end of their compression.
    download_concurrency: int = 8 * max(1, os.cpu_count() or 1)
    # Bytes of those images' sources held at once (see resources.SourceBudget).
    source_memory: int = 16 * MIB
    download_per_host: int = 8
    # One thread more than there are cores: compress() has single-threaded moments (header,
    # colour profile, encoder setup) that a third image fills; large photos stay at one a core.
    image_concurrency: int = max(1, os.cpu_count() or 1) + 1
    large_image_concurrency: int = max(1, os.cpu_count() or 1)
    image_nice: int = 10
    # Where Linux schedules by session (autogroup), a worker that leads its own session
    # puts the whole session this many levels lower (compress.lower_session_priority).
    worker_session_nice: int = 0
    upload_concurrency: int = 16
    worker_concurrency: int = 8
    images_per_job: int = 8
    max_attempts: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    stalled_seconds: float = 60.0
    shutdown_seconds: float = 20.0

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


def _text(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _parsed(
    env: Mapping[str, str],
    name: str,
    default: T,
    parse: Callable[[str], T],
    expected: str,
    *,
    secret: bool = False,
    shown: Callable[[str], str] = repr,
) -> T:
    """``name`` parsed, or ``default`` when unset. A value that does not parse is quoted
    in the error through ``shown`` (URLs without their credentials), or not at all
    when it is a ``secret``."""
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError:
        quoted = "a value that is not" if secret else shown(raw)
        raise errors.SettingsError(name, f"expected {expected}, got {quoted}") from None


def _without_credentials(raw: str) -> str:
    """A URL that did not parse, as it may be printed: nothing before its last "@" but
    a scheme (a user and password, however mangled: urlsplit cannot be trusted to find
    them in a malformed URL), and nothing from its query on (tokens live there)."""
    shown, hidden = raw, False
    if "@" in shown:
        scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/*", shown)
        shown = (scheme.group(0) if scheme else "") + "…@" + shown.rpartition("@")[2]
        hidden = True
    for mark in "?#":
        if mark in shown:
            shown, hidden = shown.partition(mark)[0], True
    return repr(shown) + (" (credentials and query not shown)" if hidden else "")


def _positive_int(raw: str) -> int:
    value = int(raw.replace("_", ""))
    if value < 1:
        raise ValueError(raw)
    return value


def _nice_steps(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 19:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(raw)
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError(raw)
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError(raw)
    return value


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(raw)
    return raw


def _db_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("postgres", "postgresql"):
        raise ValueError(raw)
    return raw


def _webhook_secret(raw: str) -> str:
    if raw.startswith("whsec_"):
        base64.b64decode(raw.removeprefix("whsec_"), validate=True)  # binascii.Error is a ValueError
    return raw


def _networks(raw: str) -> tuple[str, ...]:
    return tuple(
        str(ipaddress.ip_network(part.strip(), strict=False)) for part in raw.split(",") if part.strip()
    )


def _keys(raw: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in raw.split(",") if part.strip())
    if any(len(key) < 16 for key in keys):
        raise ValueError("short key")
    return keys


def _log_format(raw: str) -> str:
    if raw.lower() not in ("text", "json"):
        raise ValueError(raw)
    return raw.lower()


def _level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(raw)
    return level


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment, or raise SettingsError."""
    env = os.environ if env is None else env
    d = Settings()
    p = "IMGSVC_"

    def num(name: str, default: int) -> int:
        return _parsed(env, p + name, default, _positive_int, "a whole number above 0")

    def seconds(name: str, default: float) -> float:
        return _parsed(env, p + name, default, _positive_float, "a number of seconds above 0")

    def mib(name: str, default: int) -> int:
        return MIB * _parsed(
            env, p + name, default // MIB, _non_negative_int, "a whole number of MiB, 0 (no limit) or more"
        )

    def url(name: str) -> str | None:
        return _parsed(env, name, None, _http_url, "an http(s) URL", shown=_without_credentials)

    access = _text(env, "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
    secret = _text(env, "AWS_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
    bucket = _text(env, "AWS_BUCKET_NAME")
    webhook_url = url("WEBHOOK_URL")
    webhook_secret = _parsed(
        env,
        "WEBHOOK_SECRET",
        None,
        _webhook_secret,
        "whsec_ followed by base64, or any other text",
        secret=True,
    )
    if webhook_url and not webhook_secret:
        raise errors.SettingsError(
            "WEBHOOK_SECRET", "is required when WEBHOOK_URL is set: webhooks are signed"
        )
    if (access is None) != (secret is None):
        missing = "AWS_SECRET_KEY" if secret is None else "AWS_ACCESS_KEY"
        raise errors.SettingsError(missing, "set both the access key and the secret key, or neither")

    return Settings(
        port=_parsed(env, "PORT", d.port, _port, "a port number from 1 to 65535"),
        host=_text(env, p + "HOST") or d.host,
        database_url=_parsed(
            env, "DATABASE_URL", None, _db_url, "a postgresql:// URL", shown=_without_credentials
        ),
        data_dir=Path(_text(env, p + "DATA_DIR") or d.data_dir),
        public_base_url=url(p + "PUBLIC_BASE_URL"),
        log_level=_parsed(env, p + "LOG_LEVEL", d.log_level, _level, "DEBUG, INFO, WARNING or ERROR"),
        log_format=_parsed(env, p + "LOG_FORMAT", d.log_format, _log_format, "text or json"),
        metrics_port=_parsed(env, p + "METRICS_PORT", None, _port, "a port number from 1 to 65535"),
        aws_region=_text(env, "AWS_REGION", "AWS_DEFAULT_REGION") or d.aws_region,
        aws_bucket_name=bucket,
        aws_access_key=access,
        aws_secret_key=secret,
        aws_endpoint_url=url("AWS_ENDPOINT_URL"),
        s3_prefix=(_text(env, p + "S3_PREFIX") or "").strip("/"),
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        webhook_timeout=seconds("WEBHOOK_TIMEOUT", d.webhook_timeout),
        webhook_max_attempts=num("WEBHOOK_MAX_ATTEMPTS", d.webhook_max_attempts),
        webhook_retry_base_seconds=seconds("WEBHOOK_RETRY_BASE_SECONDS", d.webhook_retry_base_seconds),
        webhook_retry_max_seconds=seconds("WEBHOOK_RETRY_MAX_SECONDS", d.webhook_retry_max_seconds),
        allow_private_networks=_parsed(env, p + "ALLOW_PRIVATE_NETWORKS", False, _bool, "true or false"),
        allowed_source_networks=_parsed(
            env, p + "ALLOWED_SOURCE_NETWORKS", (), _networks, "comma-separated networks like 10.1.0.0/16"
        ),
        allow_svg=_parsed(env, p + "ALLOW_SVG", False, _bool, "true or false"),
        api_keys=_parsed(
            env, p + "API_KEYS", (), _keys, "comma-separated keys of 16 characters or more", secret=True
        ),
        max_csv_bytes=num("MAX_CSV_BYTES", d.max_csv_bytes),
        max_rows=num("MAX_ROWS", d.max_rows),
        max_images=num("MAX_IMAGES", d.max_images),
        max_urls_per_row=num("MAX_URLS_PER_ROW", d.max_urls_per_row),
        max_url_length=num("MAX_URL_LENGTH", d.max_url_length),
        max_problems=num("MAX_PROBLEMS", d.max_problems),
        max_image_bytes=num("MAX_IMAGE_BYTES", d.max_image_bytes),
        max_pixels=num("MAX_PIXELS", d.max_pixels),
        image_memory=mib("IMAGE_MEMORY_MB", d.image_memory),
        jpeg_optimize_max_pixels=_parsed(
            env,
            p + "JPEG_OPTIMIZE_MAX_PIXELS",
            d.jpeg_optimize_max_pixels,
            _non_negative_int,
            "a whole number of pixels, 0 (never) or more",
        ),
        progressive_solo_pixels=_parsed(
            env,
            p + "PROGRESSIVE_SOLO_PIXELS",
            d.progressive_solo_pixels,
            _non_negative_int,
            "a whole number of pixels, 0 (no such rule) or more",
        ),
        max_frames=num("MAX_FRAMES", d.max_frames),
        connect_timeout=seconds("CONNECT_TIMEOUT", d.connect_timeout),
        download_timeout=seconds("DOWNLOAD_TIMEOUT", d.download_timeout),
        max_redirects=_parsed(
            env, p + "MAX_REDIRECTS", d.max_redirects, _non_negative_int, "a whole number, 0 or more"
        ),
        quality_factor=_parsed(
            env, p + "QUALITY_FACTOR", d.quality_factor, _fraction, "a number above 0 and at most 1"
        ),
        download_concurrency=num("DOWNLOAD_CONCURRENCY", d.download_concurrency),
        source_memory=mib("SOURCE_MEMORY_MB", d.source_memory),
        download_per_host=num("DOWNLOAD_PER_HOST", d.download_per_host),
        image_concurrency=num("IMAGE_CONCURRENCY", d.image_concurrency),
        large_image_concurrency=num("LARGE_IMAGE_CONCURRENCY", d.large_image_concurrency),
        image_nice=_parsed(env, p + "IMAGE_NICE", d.image_nice, _nice_steps, "a whole number from 0 to 19"),
        worker_session_nice=_parsed(
            env, p + "WORKER_SESSION_NICE", d.worker_session_nice, _nice_steps, "a whole number from 0 to 19"
        ),
        upload_concurrency=num("UPLOAD_CONCURRENCY", d.upload_concurrency),
        worker_concurrency=num("WORKER_CONCURRENCY", d.worker_concurrency),
        images_per_job=num("IMAGES_PER_JOB", d.images_per_job),
        max_attempts=num("MAX_ATTEMPTS", d.max_attempts),
        retry_base_seconds=seconds("RETRY_BASE_SECONDS", d.retry_base_seconds),
        retry_max_seconds=seconds("RETRY_MAX_SECONDS", d.retry_max_seconds),
        stalled_seconds=seconds("STALLED_SECONDS", d.stalled_seconds),
        shutdown_seconds=seconds("SHUTDOWN_SECONDS", d.shutdown_seconds),
    )

"""Key naming, settings parsing, and the private-address rule."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from imgsvc import errors, fetch, ingest, localdb, settings, store


def test_image_keys_are_named_by_content_and_carry_no_user_text() -> None:
    digest = "ab" * 32
    assert store.content_key("", digest, "jpg") == f"img/{digest}.jpg"
    assert store.content_key("out", digest, "png") == f"out/img/{digest}.png"
    assert store.csv_key("out", "0b7e4a8e-0000-4000-8000-000000000001").endswith("/output.csv")


def test_s3_public_url() -> None:
    assert store.s3_public_url("b", "eu-west-1", None) == "https://b.s3.eu-west-1.amazonaws.com"
    assert store.s3_public_url("b", "x", "http://minio:9000/") == "http://minio:9000/b"


def test_settings_defaults_and_user_names() -> None:
    config = settings.from_env(
        {
            "PORT": "8080",
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
            "AWS_BUCKET_NAME": "bk",
            "IMGSVC_MAX_PIXELS": "1_000",
            "IMGSVC_JPEG_OPTIMIZE_MAX_PIXELS": "0",
            "IMGSVC_SOURCE_MEMORY_MB": "4",
            "IMGSVC_LARGE_IMAGE_CONCURRENCY": "1",
            "IMGSVC_PROGRESSIVE_SOLO_PIXELS": "0",
            "IMGSVC_WORKER_SESSION_NICE": "10",
        }
    )
    assert (config.port, config.aws_access_key, config.aws_secret_key) == (8080, "a", "b")
    assert config.max_pixels == 1000 and config.quality_factor == 0.5
    assert config.jpeg_optimize_max_pixels == 0
    assert config.source_memory == 4 * 1024 * 1024
    assert settings.from_env({}).source_memory == 16 * 1024 * 1024
    assert config.large_image_concurrency == 1
    cores = os.cpu_count() or 1
    assert (settings.from_env({}).image_concurrency, settings.from_env({}).large_image_concurrency) == (
        cores + 1,
        cores,
    )
    assert settings.from_env({}).jpeg_optimize_max_pixels == 16_000_000
    assert (config.progressive_solo_pixels, settings.from_env({}).progressive_solo_pixels) == (0, 16_000_000)
    assert (config.worker_session_nice, settings.from_env({}).worker_session_nice) == (10, 0)
    assert settings.from_env({}).aws_bucket_name is None
    defaults = settings.from_env({})
    assert (defaults.output_urls, defaults.output_base_url, defaults.presign_seconds) == (
        "public",
        None,
        3600,
    )
    signed = settings.from_env(
        {"IMGSVC_OUTPUT_URLS": "Presigned", "AWS_BUCKET_NAME": "b", "IMGSVC_PRESIGN_EXPIRES": "604800"}
    )
    assert (signed.output_urls, signed.presign_seconds) == ("presigned", 604800)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"IMGSVC_QUALITY_FACTOR": "1.5"}, "IMGSVC_QUALITY_FACTOR"),
        ({"IMGSVC_ALLOW_PRIVATE_NETWORKS": "maybe"}, "IMGSVC_ALLOW_PRIVATE_NETWORKS"),
        ({"WEBHOOK_URL": "ftp://x"}, "WEBHOOK_URL"),
        ({"AWS_ACCESS_KEY": "only-one"}, "AWS_SECRET_KEY"),
        ({"IMGSVC_MAX_REDIRECTS": "-1"}, "IMGSVC_MAX_REDIRECTS"),
        ({"IMGSVC_JPEG_OPTIMIZE_MAX_PIXELS": "many"}, "IMGSVC_JPEG_OPTIMIZE_MAX_PIXELS"),
        ({"IMGSVC_SOURCE_MEMORY_MB": "-1"}, "IMGSVC_SOURCE_MEMORY_MB"),
        ({"IMGSVC_PROGRESSIVE_SOLO_PIXELS": "-5"}, "IMGSVC_PROGRESSIVE_SOLO_PIXELS"),
        ({"IMGSVC_WORKER_SESSION_NICE": "20"}, "IMGSVC_WORKER_SESSION_NICE"),
        ({"IMGSVC_OUTPUT_URLS": "signed"}, "IMGSVC_OUTPUT_URLS"),
        ({"IMGSVC_OUTPUT_URLS": "presigned"}, "IMGSVC_OUTPUT_URLS"),  # no bucket to sign for
        (
            {
                "IMGSVC_OUTPUT_URLS": "presigned",
                "AWS_BUCKET_NAME": "b",
                "IMGSVC_OUTPUT_BASE_URL": "https://cdn.x",
            },
            "IMGSVC_OUTPUT_BASE_URL",
        ),
        ({"IMGSVC_PRESIGN_EXPIRES": "604801"}, "IMGSVC_PRESIGN_EXPIRES"),  # S3's limit is 7 days
        ({"IMGSVC_PRESIGN_EXPIRES": "0"}, "IMGSVC_PRESIGN_EXPIRES"),
        ({"IMGSVC_OUTPUT_BASE_URL": "images.example.com"}, "IMGSVC_OUTPUT_BASE_URL"),
    ],
)
def test_a_bad_setting_names_its_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(errors.SettingsError) as caught:
        settings.from_env(env)
    assert caught.value.name == name and caught.value.message.startswith(name)


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("DATABASE_URL", "postgresql+psycopg://app:pw-1234@db:5432/x", "'postgresql+psycopg://…@db:5432/x'"),
        # Malformed ones, where urlsplit would find no password or the wrong host:
        ("DATABASE_URL", "postgresql+psycopg://app:pw/1234@db/x", "'postgresql+psycopg://…@db/x'"),
        ("DATABASE_URL", "postgres-ql://app:pw#1234@db/x", "'postgres-ql://…@db/x'"),
        ("WEBHOOK_URL", "https:/user:pw-1234@hooks.example/in", "'https:/…@hooks.example/in'"),
        ("WEBHOOK_URL", "https//user:pw-1234@hooks.example/in", "'…@hooks.example/in'"),
        ("WEBHOOK_URL", "ftp://hooks.example/in?token=tok-1234", "'ftp://hooks.example/in'"),
        ("AWS_ENDPOINT_URL", "s3://key:pw-1234@store.example", "'s3://…@store.example'"),
        ("IMGSVC_PUBLIC_BASE_URL", "http://[::1:pw-1234@x", "'http://…@x'"),
    ],
)
def test_a_bad_url_setting_is_quoted_without_its_credentials(name: str, value: str, shown: str) -> None:
    with pytest.raises(errors.SettingsError) as caught:
        settings.from_env({name: value})
    assert shown in caught.value.message
    assert "1234" not in caught.value.message


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        ("0.0.0.0", "http://localhost:5000"),  # noqa: S104
        ("::1", "http://localhost:5000"),
        ("fd00::5", "http://[fd00::5]:5000"),
    ],
)
def test_the_default_public_url_is_a_url_whatever_the_host(host: str, base_url: str) -> None:
    assert settings.from_env({"IMGSVC_HOST": host}).base_url == base_url


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",  # noqa: S104
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b:1::1",  # local-use NAT64
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "fec0::1",  # site-local (deprecated)
        "224.0.0.1",
        "255.255.255.255",
    ],
)
def test_private_and_reserved_addresses_are_blocked(address: str) -> None:
    assert fetch.blocked_reason(address) is not None


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "2606:4700::6810:84e5", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert fetch.blocked_reason(address) is None


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://127.0.0.1/x.jpg", errors.BlockedAddress),
        ("http://[::1]:8080/x.jpg", errors.BlockedAddress),
        ("http://[::ffff:169.254.169.254]/", errors.BlockedAddress),
        ("file:///etc/passwd", errors.PermanentError),
        ("gopher://example.com/", errors.PermanentError),
    ],
)
def test_literal_hosts_and_schemes_are_checked_before_connecting(url: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        fetch.check_address(url, fetch.Limits())
    if error is errors.BlockedAddress:
        fetch.check_address(url, fetch.Limits(allow_private_networks=True))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@cdn.test/a.jpg", "https://***@cdn.test/a.jpg"),
        ("https://token@cdn.test:8443/a.jpg?x=1", "https://***@cdn.test:8443/a.jpg?x=1"),
        ("https://cdn.test/a.jpg?sig=abc", "https://cdn.test/a.jpg?sig=abc"),
    ],
)
def test_credentials_in_urls_are_hidden(url: str, shown: str) -> None:
    assert ingest.redact_url(url) == shown


async def test_local_storage_stores_bytes_and_files_from_their_start(tmp_path: Path) -> None:
    local = store.LocalStorage(tmp_path, "http://files.test/files")
    assert await local.put("r/a.jpg", b"bytes", "image/jpeg") == "http://files.test/files/r/a.jpg"
    with tempfile.SpooledTemporaryFile(max_size=4) as spooled:  # spills to disk past 4 bytes
        spooled.write(b"S. No.,Product Name\r\n")
        await local.put("r/output.csv", spooled, "text/csv")
    assert (tmp_path / "r/a.jpg").read_bytes() == b"bytes"
    assert (tmp_path / "r/output.csv").read_bytes() == b"S. No.,Product Name\r\n"


def test_without_postgresql_binaries_a_local_database_says_to_install_the_extra(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "initdb").touch()  # half an installation is none
    with pytest.raises(errors.ImgsvcError) as caught:
        localdb.find_bindir([tmp_path / "nothing", tmp_path / "bin"])
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install 'imgsvc[local]'" in message and "DATABASE_URL" in message
    (tmp_path / "bin" / "pg_ctl").touch()
    assert localdb.find_bindir([tmp_path / "nothing", tmp_path / "bin"]) == tmp_path / "bin"

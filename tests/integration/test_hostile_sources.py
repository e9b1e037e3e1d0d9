"""Hostile sources: each is refused or failed with a clear reason, within the timeouts,
and nothing is ever fetched from a private address while private networks are refused."""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator

import pytest

from imgsvc import errors, fetch, models, pipeline, resources, settings
from tests.conftest import store_request
from tests.servers import HostileServer, ImageServer, StubResolver

# Names that resolve, through the stub, to addresses that must never be fetched from.
PRIVATE_NAMES = {
    "metadata.test": "169.254.169.254",
    "intranet.test": "10.1.2.3",
    "v6-loopback.test": "::1",
    "v6-mapped.test": "::ffff:10.0.0.1",
    "shared.test": "100.64.0.9",
}


@pytest.fixture
async def guarded(config: settings.Settings, database_url: str) -> AsyncIterator[resources.Resources]:
    """Private networks refused, except the loopback network the test servers are on;
    short timeouts, a small byte cap, one attempt."""
    import dataclasses

    strict = dataclasses.replace(
        config,
        allow_private_networks=False,
        allowed_source_networks=("127.0.0.0/8",),
        connect_timeout=1.0,
        download_timeout=3.0,
        max_image_bytes=2 * 1024 * 1024,
        max_attempts=1,
    )
    async with resources.opened(strict, database_url, resolver=StubResolver(PRIVATE_NAMES)) as res:
        yield res


async def outcome(res: resources.Resources, url: str) -> tuple[str, str | None, float]:
    product = models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url,))
    rid = await store_request(res.pool, [product], file_name=None)
    image_id = await res.pool.fetchval("SELECT id FROM images WHERE request_id = $1", uuid.UUID(rid))
    started = time.monotonic()
    status = await pipeline.process_image(res, image_id)
    error = await res.pool.fetchval("SELECT error FROM images WHERE id = $1", image_id)
    return status, error, time.monotonic() - started


def to(hostile: HostileServer, target: str) -> str:
    return hostile.url("/to?" + urllib.parse.quote(target, safe=""))


@pytest.mark.parametrize(
    ("path", "words", "within"),
    [
        ("/drip", "did not answer in time", 3.0),
        ("/silent", "did not answer in time", 3.0),
        ("/loop", "more than 5 redirects", 0),
        ("/short-body", "the connection to the source broke", 0),
        ("/long-body", "malformed HTTP response|not an image", 0),  # which one depends on timing
        ("/huge-length", "the source is 1,000,000,000,000 bytes; the limit is 2,097,152", 0),
        ("/chunked-endless", "over the limit of 2,097,152 bytes", 0),
        ("/gzip-bomb", "over the limit of 2,097,152 bytes", 0),
    ],
)
async def test_misbehaving_servers_fail_with_a_reason_in_time(
    guarded: resources.Resources, hostile: HostileServer, path: str, words: str, within: float
) -> None:
    status, error, elapsed = await outcome(guarded, hostile.url(path))
    assert status == "failed"
    assert any(choice in str(error) for choice in words.split("|")), error
    # Stopped by the configured timeout or limit, not by anything later: each of these
    # servers would otherwise go on for as long as the test let it.
    assert elapsed < within + 10.0


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is in a private"),
        ("http://10.0.0.1/x.jpg", "10.0.0.1 is in a private"),
        ("http://[::1]:80/x.jpg", "::1 is in a private"),
        ("http://[::ffff:10.0.0.1]/x.jpg", "embeds 10.0.0.1"),
        ("http://[::ffff:a9fe:a9fe]/x.jpg", "embeds 169.254.169.254"),
        # Hosts that urlsplit reads as names and yarl, as aiohttp connects, as addresses.
        ("http://①⑥⑨.②⑤④.①⑥⑨.②⑤④/latest/meta-data/", "169.254.169.254 is in a private"),
        ("http://10。0。0。1/x.jpg", "10.0.0.1 is in a private"),
        ("http://[64:ff9b::a00:1]/x.jpg", "embeds 10.0.0.1"),
        ("http://[fec0::1]/x.jpg", "fec0::1 is in a private"),
        ("http://metadata.test/latest/meta-data/", "metadata.test resolves to 169.254.169.254"),
        ("http://intranet.test/x.jpg", "intranet.test resolves to 10.1.2.3"),
        ("http://v6-loopback.test/x.jpg", "resolves to ::1"),
        ("http://v6-mapped.test/x.jpg", "embeds 10.0.0.1"),
        ("http://shared.test/x.jpg", "100.64.0.9 is in a private"),
        ("ftp://example.com/x.jpg", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
async def test_redirects_to_private_addresses_and_other_schemes_are_refused(
    guarded: resources.Resources, hostile: HostileServer, target: str, words: str
) -> None:
    status, error, _ = await outcome(guarded, to(hostile, target))
    assert status == "failed" and words in str(error), error
    assert str(error).startswith(("refused", "only http"))


async def test_names_resolving_to_private_addresses_are_refused_directly(
    guarded: resources.Resources,
) -> None:
    for name, address in PRIVATE_NAMES.items():
        status, error, _ = await outcome(guarded, f"http://{name}/image.jpg")
        assert status == "failed" and f"{name} resolves to" in str(error), error
        assert f"resolves to {ipaddress.ip_address(address)}" in str(error), error


async def test_the_allowed_network_still_works(
    guarded: resources.Resources, image_server: ImageServer
) -> None:
    status, error, _ = await outcome(guarded, image_server.url("/img/png_palette_trns.png"))
    assert (status, error) == ("done", None)


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/hook", "http://[::1]/hook", "http://localhost:9/hook", "https://10.0.0.8/hook"],
)
async def test_webhook_urls_on_private_addresses_are_refused_at_upload(url: str) -> None:
    with pytest.raises(errors.BlockedAddress):
        await fetch.check_destination(url, fetch.Limits())


async def test_webhook_urls_that_do_not_resolve_are_refused_at_upload() -> None:
    with pytest.raises(errors.PermanentError, match="does not resolve"):
        await fetch.check_destination("https://no-such-host.invalid/hook", fetch.Limits())


async def test_a_malformed_redirect_fails_with_a_reason(
    guarded: resources.Resources, hostile: HostileServer
) -> None:
    status, error, _ = await outcome(guarded, to(hostile, "http://[::1"))
    assert status == "failed"
    assert error == "the source redirected to a malformed URL: 'http://[::1'"

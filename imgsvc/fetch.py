"""Fetch a source image: streamed, capped, timed, and never from a private network.

The address check happens at connect time: a resolver that refuses private answers
(so the address checked is the address connected to), plus a check of literal IP
hosts, which aiohttp does not resolve. That check reads the host as yarl, and so
aiohttp, will connect to it: yarl normalises hosts (IDNA, and Unicode digits and dots
to ASCII), so `http://①②⑦。0。0。1/` is 127.0.0.1 to aiohttp while `urlsplit` sees a
name. Redirects are followed here, one hop at a time, so every hop is checked again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import socket
import zlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from imgsvc import catalog, errors

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUSES = frozenset({408, 425, 429})


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 ranges that Python 3.11 counts as global but that reach, or may reach, private
# places: NAT64's well-known prefix carries an IPv4 address in its last 32 bits (checked
# as that address), the local-use NAT64 prefix and the old site-local range do not.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NOT_GLOBAL_V6 = (ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"))


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """How a download is bounded, and where it may go."""

    max_bytes: int = 40 * 1024 * 1024
    max_redirects: int = 5
    allow_private_networks: bool = False
    allowed_networks: tuple[Network, ...] = ()


def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """Parsed networks (IMGSVC_ALLOWED_SOURCE_NETWORKS)."""
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


def blocked_reason(address: str, allowed: tuple[Network, ...] = ()) -> str | None:
    """Why an IP address may not be fetched from, or None if it is public or allowed."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    if any(ip in network for network in allowed):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and (ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1)):
            # NAT64, or the deprecated IPv4-compatible form ::a.b.c.d
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and any(ip in network for network in _NOT_GLOBAL_V6):
            return f"{ip} is in a private, loopback, link-local or reserved network"
        if embedded is not None:
            reason = blocked_reason(str(embedded), allowed)
            return f"{ip} embeds {embedded}: {reason}" if reason else None
    if not ip.is_global or ip.is_multicast:
        return f"{ip} is in a private, loopback, link-local or reserved network"
    return None


class RefusedAddress(OSError):
    """Raised by the resolver; aiohttp wraps it in ClientConnectorDNSError."""


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` (the system's resolver by default), but refuses a name
    with any address that is neither public nor allowed."""

    def __init__(self, allowed: tuple[Network, ...] = (), inner: AbstractResolver | None = None) -> None:
        self._allowed = allowed
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            reason = blocked_reason(result["host"], self._allowed)
            if reason is not None:
                raise RefusedAddress(f"{host} resolves to {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def create_session(
    *,
    user_agent: str,
    connect_timeout: float,
    total_timeout: float,
    concurrency: int,
    per_host: int,
    limits: Limits,
    resolver: AbstractResolver | None = None,
) -> aiohttp.ClientSession:
    """One HTTP client session for the whole process; ``resolver`` replaces the system's."""
    if not limits.allow_private_networks:
        resolver = GuardedResolver(limits.allowed_networks, resolver)
    connector = aiohttp.TCPConnector(
        limit=concurrency, limit_per_host=per_host, resolver=resolver, ttl_dns_cache=60
    )
    timeout = aiohttp.ClientTimeout(
        total=total_timeout, sock_connect=connect_timeout, sock_read=connect_timeout * 3
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        auto_decompress=False,
        headers={
            "User-Agent": user_agent,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "gzip, deflate, identity",
        },
    )


def check_address(url: str | yarl.URL, limits: Limits) -> yarl.URL:
    """The URL as aiohttp connects to it, once its scheme is http(s) and its host is not
    a literal IP address outside the public or allowed networks; connect to this one."""
    try:
        parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
    except (ValueError, TypeError) as exc:
        raise errors.PermanentError("the URL is not valid") from exc
    if parsed.scheme not in ("http", "https"):
        raise errors.PermanentError(f"only http and https URLs are fetched, not {parsed.scheme or 'none'}")
    host = parsed.raw_host or ""
    if not limits.allow_private_networks and _is_ip(host):
        reason = blocked_reason(host, limits.allowed_networks)
        if reason is not None:
            raise errors.BlockedAddress(f"refused to fetch {host}: {reason}")
    return parsed  # a name: the resolver checks what it resolves to


async def check_destination(url: str, limits: Limits) -> None:
    """Refuse a URL whose host is, or resolves to, a non-public address (for webhook URLs
    given at upload; the delivery itself is checked again at connect time)."""
    parsed = check_address(url, limits)
    host = parsed.raw_host or ""
    if limits.allow_private_networks or _is_ip(host):
        return
    try:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, parsed.port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise errors.PermanentError(f"the host {host} does not resolve") from None
    for info in infos:
        reason = blocked_reason(str(info[4][0]), limits.allowed_networks)
        if reason is not None:
            raise errors.BlockedAddress(f"{host} resolves to {reason}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def _read_body(
    response: aiohttp.ClientResponse, limits: Limits, expect: Callable[[int], Awaitable[None]] | None
) -> tuple[bytes, str]:
    """The body within the limits, and its SHA-256, taken chunk by chunk as it comes."""
    declared = response.content_length
    if declared is not None and declared > limits.max_bytes:
        raise errors.SourceTooLarge(
            f"the source is {declared:,} bytes; the limit is {limits.max_bytes:,} (IMGSVC_MAX_IMAGE_BYTES)"
        )
    if declared is not None and expect is not None:
        await expect(declared)  # may wait for memory before the body is read
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    decoder: Any = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
    elif encoding not in ("identity", ""):
        raise errors.PermanentError(f"the source used Content-Encoding {encoding!r}, which is not supported")
    # The chunks as aiohttp received them, joined once at the end: one copy of the
    # source, where growing a bytearray and converting it made two or three.
    chunks: list[bytes] = []
    size = 0
    digest = hashlib.sha256()
    async for chunk in response.content.iter_any():
        if decoder is not None:
            # Decompress at most one byte past the cap: a bomb stops here.
            chunk = decoder.decompress(chunk, limits.max_bytes + 1 - size)
        chunks.append(chunk)
        digest.update(chunk)
        size += len(chunk)
        if size > limits.max_bytes:
            raise errors.SourceTooLarge(
                f"the source is over the limit of {limits.max_bytes:,} bytes (IMGSVC_MAX_IMAGE_BYTES)"
            )
    return b"".join(chunks), digest.hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Fetched:
    """What a source answered: its bytes (None when it answered 304 Not Modified to our
    validators) and the validators to ask it with next time."""

    data: bytes | None
    validators: catalog.Validators
    sha256: str | None = None


async def download(
    session: aiohttp.ClientSession,
    url: str,
    limits: Limits,
    *,
    expect: Callable[[int], Awaitable[None]] | None = None,
) -> bytes:
    """The bytes at ``url``, following redirects; raise Permanent- or TransientError.
    ``expect`` is told the size the source declares before its body is read."""
    fetched = await fetch(session, url, limits, expect=expect)
    assert fetched.data is not None  # no validators were sent
    return fetched.data


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    limits: Limits,
    *,
    expect: Callable[[int], Awaitable[None]] | None = None,
    validators: catalog.Validators | None = None,
) -> Fetched:
    """The source at ``url``, asked with ``validators`` if there are any: a 304 that
    answers them gives no bytes. A 304 whose ETag is not the one asked with is not
    trusted (the source is fetched again without validators); a 304 to a request
    without validators is an error."""
    fetched = await _fetch(session, url, limits, expect, validators or catalog.Validators())
    if fetched is None:  # an untrusted 304
        fetched = await _fetch(session, url, limits, expect, catalog.Validators())
        if fetched is None:
            raise errors.PermanentError(
                "the source answered 304 Not Modified to a request without validators"
            )
    return fetched


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    limits: Limits,
    expect: Callable[[int], Awaitable[None]] | None,
    validators: catalog.Validators,
) -> Fetched | None:
    current = url
    headers = validators.headers()
    for _ in range(limits.max_redirects + 1):
        target = check_address(current, limits)
        try:
            async with session.get(target, allow_redirects=False, headers=headers) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise errors.PermanentError(
                            f"the source answered HTTP {response.status} without a Location"
                        )
                    try:
                        current = urljoin(str(target), location)
                    except ValueError:
                        raise errors.PermanentError(
                            f"the source redirected to a malformed URL: {location[:200]!r}"
                        ) from None
                    continue
                if response.status == 304:
                    return _not_modified(response, validators)
                if response.status in _RETRY_STATUSES or response.status >= 500:
                    raise errors.TransientError(
                        f"the source answered HTTP {response.status} {response.reason or ''}".rstrip()
                    )
                if response.status != 200:
                    raise errors.PermanentError(
                        f"the source answered HTTP {response.status} {response.reason or ''}".rstrip()
                    )
                data, sha256 = await _read_body(response, limits, expect)
                return Fetched(
                    data,
                    catalog.Validators(
                        catalog.strong_etag(response.headers.get("ETag")),
                        response.headers.get("Last-Modified"),
                    ),
                    sha256,
                )
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedAddress):
                raise errors.BlockedAddress(f"refused to fetch: {exc.os_error}") from exc
            raise errors.TransientError(f"could not connect to {exc.host}:{exc.port}") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise errors.TransientError(f"the connection to the source broke ({type(exc).__name__})") from exc
        except aiohttp.InvalidURL as exc:
            raise errors.PermanentError("the URL is not valid") from exc
        except aiohttp.TooManyRedirects as exc:
            raise errors.PermanentError("too many redirects") from exc
        except aiohttp.ClientResponseError as exc:
            raise errors.TransientError(
                "the source sent a malformed HTTP response (its length or framing does not match its body)"
            ) from exc
        except TimeoutError as exc:
            raise errors.TransientError("the source did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise errors.TransientError(f"the download failed ({type(exc).__name__})") from exc
    raise errors.PermanentError(f"more than {limits.max_redirects} redirects (IMGSVC_MAX_REDIRECTS)")


def _not_modified(response: aiohttp.ClientResponse, asked: catalog.Validators) -> Fetched | None:
    """A 304 that answers what was asked, or None. When we asked with an ETag and the 304
    names another (it must send the ETag it would send with a 200), it is not an answer
    to our question."""
    if not asked:
        return None
    etag = response.headers.get("ETag")
    if asked.etag and etag is not None and catalog.strong_etag(etag) != asked.etag:
        return None
    return Fetched(None, asked)

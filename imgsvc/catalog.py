"""Catalog reuse, the pure part: when two source URLs are the same, and the validators
a source is asked again with.

A source URL is matched after lower-casing its scheme and host and dropping a default
port, and nothing else: a path or query differs, the URL differs. What makes two
outputs of the same bytes the same is ``compress.settings_key``.
"""

from __future__ import annotations

import dataclasses
import hashlib

_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normalize_url(url: str) -> str:
    """``url`` with its scheme and host lower-cased and a default port dropped."""
    # Most URLs are already so: an http(s) URL whose authority has no capital, user
    # name or IPv6 literal, and no default port, is returned as it is, at a third of
    # the cost.
    if url.startswith("https://"):
        start, default = 8, ":443"
    elif url.startswith("http://"):
        start, default = 7, ":80"
    else:
        start, default = 0, ""
    if start:
        end = url.find("/", start)
        authority = url[start:] if end == -1 else url[start:end]
        if (
            authority.lower() == authority
            and "@" not in authority
            and "[" not in authority
            and "?" not in authority
            and "#" not in authority
            and not authority.endswith(default)
        ):
            return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    scheme = scheme.lower()
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):  # an IPv6 literal
        close = hostport.find("]")
        host, port = hostport[: close + 1], hostport[close + 1 :].removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    hostport = host.lower() + (f":{port}" if port and port != _DEFAULT_PORTS.get(scheme) else "")
    return f"{scheme}://{userinfo}{at}{hostport}{tail}"


def sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Validators:
    """What an origin sent to ask it again with: a strong ETag, a Last-Modified date."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    def headers(self) -> dict[str, str]:
        """The conditional request headers that ask with these validators."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


def strong_etag(value: str | None) -> str | None:
    """An ETag that promises the same bytes, or None: weak ones (W/) promise only an
    equivalent representation, and a malformed one promises nothing."""
    if value is None:
        return None
    value = value.strip()
    if len(value) < 2 or not (value.startswith('"') and value.endswith('"')) or len(value) > 512:
        return None
    return value

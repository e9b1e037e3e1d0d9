"""A catalog origin for the reuse tests: real HTTP, files whose bytes the test changes,
and a way of answering validators for each path prefix, honest or not."""

from __future__ import annotations

import dataclasses
import hashlib
from email.utils import formatdate

from aiohttp import web

from tests.servers import _Served, _ThreadServer


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """One request the origin answered."""

    path: str
    status: int
    conditional: bool


class CatalogOrigin(_Served):
    """Serves ``files`` (path -> bytes; change them between runs) under a prefix that
    says how the origin treats validators:

    /honest/PATH   a strong ETag (of the bytes) and a Last-Modified; 304 when either matches
    /ignore/PATH   no validators, and a 200 whatever is asked
    /weak/PATH     a weak ETag that never changes; a 200 whatever is asked
    /sticky/PATH   the same strong ETag whatever the bytes; a 200 whatever is asked
    /liar/PATH     304 to every request, with or without validators
    /wrong/PATH    a strong ETag; a conditional request gets a 304 naming another ETag
    /lm/PATH       only Last-Modified (changed with the bytes); 304 when it matches
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: list[Hit] = []
        self._modified: dict[str, tuple[str, str]] = {}  # path -> (sha256, Last-Modified)
        self._server = _ThreadServer(self._routes)

    def url(self, mode: str, path: str) -> str:
        """The URL of a file, served in ``mode``."""
        return f"http://127.0.0.1:{self.port}/{mode}/{path}"

    def bodies(self, path: str | None = None) -> int:
        """How many answers carried a body (of a path with ``path`` in it, or of any)."""
        return sum(1 for hit in self.hits if hit.status == 200 and (path is None or path in hit.path))

    def _last_modified(self, path: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        known = self._modified.get(path)
        if known is None or known[0] != digest:
            # A new date for new bytes: a second later than the last, as a clock would say.
            seconds = 1_700_000_000 + len(self._modified) + sum(1 for _ in self.hits)
            known = (digest, formatdate(seconds, usegmt=True))
            self._modified[path] = known
        return known[1]

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        mode, path = request.match_info["mode"], request.match_info["path"]
        inm, ims = request.headers.get("If-None-Match"), request.headers.get("If-Modified-Since")
        conditional = inm is not None or ims is not None

        def answer(status: int, body: bytes = b"", **headers: str) -> web.StreamResponse:
            self.hits.append(Hit(request.path, status, conditional))
            if status == 304:
                return web.Response(status=304, headers=headers)
            return web.Response(body=body, content_type="application/octet-stream", headers=headers)

        data = self.files.get(path)
        if data is None:
            self.hits.append(Hit(request.path, 404, conditional))
            return web.Response(status=404, text="not found")
        etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
        if mode == "honest":
            last_modified = self._last_modified(path, data)
            if inm == etag or (inm is None and ims == last_modified):
                return answer(304, ETag=etag)
            return answer(200, data, ETag=etag, **{"Last-Modified": last_modified})
        if mode == "lm":
            last_modified = self._last_modified(path, data)
            if ims == last_modified:
                return answer(304)
            return answer(200, data, **{"Last-Modified": last_modified})
        if mode == "ignore":
            return answer(200, data)
        if mode == "weak":
            return answer(200, data, ETag='W/"v1"')
        if mode == "sticky":
            return answer(200, data, ETag='"v1"')
        if mode == "liar":
            return answer(304, ETag='"v1"')
        if mode == "wrong":
            if conditional:
                return answer(304, ETag='"some-other-version"')
            return answer(200, data, ETag=etag)
        return web.Response(status=400, text=f"unknown mode {mode}")

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/{mode}/{path:.+}", self._serve)

"""A static server for the source images, run as its own process by the benchmark.

    python -m bench.imageserver --root DIR --port PORT

GET /img/{index}/{name} answers the file ``name`` of DIR (the index only makes each
URL of a CSV unique), with a strong ETag and a Last-Modified, and 304 Not Modified to
a request that names them, as a real image host does; anything else, including a
name not in DIR, answers 404.

GET /tiny/{index}.jpg answers a 64x48 JPEG made at start from the first JPEG of DIR,
with the index after its end: every URL has its own bytes (nothing is reused) and the
codec costs next to nothing, so what is measured is the pipeline around it.

POST /change/{index} changes what every URL of that index answers (the file, with a
few bytes after its end: other bytes, the same picture), as a re-exported image in a
catalog would. GET /stats says how many answers carried a body and how many were 304s.
"""

from __future__ import annotations

import argparse
import zlib
from email.utils import formatdate
from pathlib import Path

from aiohttp import web

_EPOCH = 1_700_000_000


def make_app(root: Path) -> web.Application:
    """The aiohttp application serving ``root``. Each file is read on its first request
    and kept: a file response costs a stat and an open in a thread on every request,
    CPU on the benchmark's machine that a remote image host would not take from it."""
    names = {path.name: path for path in root.iterdir() if path.is_file()}
    bodies: dict[str, bytes] = {}
    versions: dict[str, int] = {}  # index -> how many times it was changed
    stats = {"bodies": 0, "not_modified": 0}

    async def image(request: web.Request) -> web.StreamResponse:
        index, name = request.match_info["index"], request.match_info["name"]
        path = names.get(name)
        if path is None:
            return web.Response(status=404, text="not found")
        body = bodies.get(name)
        if body is None:
            body = bodies[name] = path.read_bytes()
        version = versions.get(index, 0)
        etag = f'"{zlib.crc32(name.encode()):08x}-{version}"'
        headers = {"ETag": etag, "Last-Modified": formatdate(_EPOCH + version, usegmt=True)}
        if request.headers.get("If-None-Match") == etag:
            stats["not_modified"] += 1
            return web.Response(status=304, headers=headers)
        stats["bodies"] += 1
        if version:
            # After the image's end, where decoders ignore it; with the index, so that no two
            # changed sources have the same bytes.
            body += f"\0changed {index} {version}".encode()
        return web.Response(body=body, content_type="application/octet-stream", headers=headers)

    async def change(request: web.Request) -> web.StreamResponse:
        index = request.match_info["index"]
        versions[index] = versions.get(index, 0) + 1
        return web.json_response({"index": index, "version": versions[index]})

    async def counts(request: web.Request) -> web.StreamResponse:
        return web.json_response(stats)

    small = tiny_jpeg(root)

    async def tiny(request: web.Request) -> web.StreamResponse:
        stats["bodies"] += 1
        body = small + f"\0{request.match_info['index']}".encode()
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{index}/{name}", image)
    app.router.add_get("/tiny/{index}.jpg", tiny)
    app.router.add_post("/change/{index}", change)
    app.router.add_get("/stats", counts)
    return app


def tiny_jpeg(root: Path) -> bytes:
    """A 64x48 JPEG of the first JPEG in ``root`` (by name), or of a gradient."""
    import pyvips  # only this route needs it

    jpegs = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if jpegs:
        image = pyvips.Image.thumbnail(str(jpegs[0]), 64, height=48, crop="centre")
    else:
        image = (pyvips.Image.xyz(64, 48)[0] * 4).cast("uchar").bandjoin([128, 64])
    data: bytes = image.jpegsave_buffer(Q=80, strip=True)
    return data


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(args.root),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()

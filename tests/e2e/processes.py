"""Running imgsvc as processes, and talking to it over HTTP, as a user would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import WEBHOOK_SECRET, test_env
from tests.servers import S3Server


class Process:
    """An imgsvc (or procrastinate) command running as its own process, with its log."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, *, own_session: bool = False) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=own_session
            )

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.popen.terminate()
        return self.popen.wait(30)


def service_env(database_url: str, s3: S3Server, tmp_path: Path, port: int) -> dict[str, str]:
    """The environment of a service under test: the test servers, and retries a little slower
    than in-process tests so that a request stays unfinished long enough to look at."""
    return {
        **os.environ,
        **test_env(s3, tmp_path),
        "DATABASE_URL": database_url,
        "PORT": str(port),
        "IMGSVC_MAX_ROWS": "20",
        "IMGSVC_RETRY_BASE_SECONDS": "1",
        "IMGSVC_RETRY_MAX_SECONDS": "2",
    }


def wait_until_up(base: str, process: Process) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(base + "/", timeout=1)
            return
        except (urllib.error.URLError, ConnectionError):
            assert process.popen.poll() is None, process.output()
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.2)


SECRETS = (WEBHOOK_SECRET, S3Server.secret_key)


def assert_clean_exit(*processes: Process) -> None:
    """Each process stops on SIGTERM with status 0, and its log has no traceback and no secret.
    All are stopped before any is judged, so one failure leaves nothing running."""
    codes = [process.stop() for process in processes]
    for process, code in zip(processes, codes, strict=True):
        output = process.output()
        assert code == 0, output
        assert "Traceback" not in output, output
        assert not any(secret in output for secret in SECRETS)


async def post_csv(
    session: aiohttp.ClientSession,
    base: str,
    body: bytes,
    field: str = "file",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Upload a CSV as a browser or curl would."""
    form = aiohttp.FormData()
    form.add_field(field, body, filename="products.csv", content_type="text/csv")
    async with session.post(base + "/upload", data=form, headers=headers) as response:
        return response.status, await response.json()


async def wait_for_final(session: aiohttp.ClientSession, url: str, seconds: float = 30) -> dict[str, Any]:
    """Poll a request's status until it is final."""
    for _ in range(int(seconds * 10)):
        async with session.get(url) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
        if body["status"] not in ("queued", "processing"):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"the request did not finish: {json.dumps(body)[:500]}")


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, *args: str) -> Iterator[tuple[str, Process]]:
    """`imgsvc serve ARGS` on the environment's PORT: yields (base URL, process) once it
    answers, and stops it cleanly after (exit 0, no traceback, no secret in its log)."""
    process = Process([sys.executable, "-m", "imgsvc", "serve", *args], env, log)
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_until_up(base, process)
        yield base, process
    finally:
        assert_clean_exit(process)

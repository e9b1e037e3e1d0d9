"""Faults, with the service as processes: workers killed or stopped mid-batch, the
database restarted, oversized uploads; and who may do what (API keys, idempotency)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from imgsvc import localdb, migrate
from tests.e2e.processes import (
    Process,
    assert_clean_exit,
    post_csv,
    service_env,
    serving,
    wait_for_final,
    wait_until_up,
)
from tests.servers import ImageServer, S3Server

HEADER = "S. No.,Product Name,Input Image Urls\n"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def query(database_url: str, sql: str) -> object:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def wait_for(database_url: str, sql: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not await query(database_url, sql):
        assert time.monotonic() < deadline, f"never true: {sql}"
        await asyncio.sleep(0.1)


def slow_csv(image_server: ImageServer, count: int, ms: int) -> bytes:
    """``count`` products of two images each: its own source, and the next product's, so
    that every source is shared by two slots (``count`` sources, twice as many images)."""
    names = ["png_palette_trns.png", "gif_animated_loop3.gif", "jpeg_cmyk_adobe_no-icc.jpg"]

    def url(n: int) -> str:
        return image_server.url(f"/slow/{ms}/{names[n % 3]}?source={n}")

    rows = "".join(f'{n},P{n},"{url(n)},{url(n % count + 1)}"\n' for n in range(1, count + 1))
    return (HEADER + rows).encode()


@pytest.fixture
def api(database_url: str, s3: S3Server, tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Process]]:
    """The API alone; tests start their own workers. Yields (base URL, environment, process)."""
    port = localdb.free_port()
    env = {
        **service_env(database_url, s3, tmp_path, port),
        "IMGSVC_STALLED_SECONDS": "2",
        "IMGSVC_SHUTDOWN_SECONDS": "1",
    }
    with serving(env, tmp_path / "api.log", "--no-worker") as (base, process):
        yield base, env, process


def worker(env: dict[str, str], log: Path) -> Process:
    return Process([sys.executable, "-m", "imgsvc", "worker"], env, log)


async def test_a_worker_killed_mid_batch_loses_nothing(
    api: tuple[str, dict[str, str], Process], database_url: str, image_server: ImageServer, tmp_path: Path
) -> None:
    base, env, _ = api
    first = worker(env, tmp_path / "first.log")
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, base, slow_csv(image_server, 12, 2000))
        assert status == 202
        await wait_for(database_url, "SELECT count(*) >= 4 FROM images WHERE status = 'processing'")
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
        second = worker(env, tmp_path / "second.log")
        try:
            final = await wait_for_final(session, accepted["status_url"], seconds=120)
        finally:
            assert_clean_exit(second)
    assert final["status"] == "completed" and final["counts"]["done"] == 24
    retried = await query(database_url, "SELECT count(*) FROM images WHERE attempts > 1")
    assert isinstance(retried, int) and retried >= 1  # the killed worker's images ran again
    # Every slot has its output; the 12 sources are 3 distinct files: 3 objects in all.
    assert await query(database_url, "SELECT count(*) FROM images WHERE output_key IS NULL") == 0
    assert await query(database_url, "SELECT count(*) FROM images WHERE reused = 'duplicate'") == 12
    assert await query(database_url, "SELECT count(DISTINCT output_key) FROM images") == 3
    assert "stalled worker" in second.output()


async def test_sigterm_releases_in_flight_images_and_nothing_stays_processing(
    api: tuple[str, dict[str, str], Process], database_url: str, image_server: ImageServer, tmp_path: Path
) -> None:
    base, env, _ = api
    first = worker(env, tmp_path / "first.log")
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, base, slow_csv(image_server, 6, 8000))
        assert status == 202
        await wait_for(database_url, "SELECT count(*) >= 3 FROM images WHERE status = 'processing'")
        started = time.monotonic()
        assert_clean_exit(first)  # SIGTERM; exit 0, no traceback
        assert time.monotonic() - started < 15  # IMGSVC_SHUTDOWN_SECONDS=1, plus closing down
        assert await query(database_url, "SELECT count(*) FROM images WHERE status = 'processing'") == 0
        interrupted = await query(
            database_url, "SELECT count(*) FROM images WHERE error LIKE 'interrupted:%'"
        )
        assert isinstance(interrupted, int) and interrupted >= 1
        second = worker(env, tmp_path / "second.log")
        try:
            final = await wait_for_final(session, accepted["status_url"], seconds=120)
        finally:
            assert_clean_exit(second)
    assert final["status"] == "completed" and final["counts"]["done"] == 12


async def test_a_database_restart_mid_batch_gives_503_then_the_batch_completes(
    s3: S3Server, image_server: ImageServer, tmp_path: Path
) -> None:
    root = Path(tempfile.mkdtemp(prefix="imgsvc-restart-"))
    os.chmod(root, 0o755)  # noqa: S103 - the cluster may run as another user
    cluster = localdb.LocalPostgres(root / "pg", fast=True)
    cluster.start()
    try:
        await migrate.apply(cluster.url)
        port = localdb.free_port()
        env = {**service_env(cluster.url, s3, tmp_path, port), "IMGSVC_STALLED_SECONDS": "2"}
        server = Process([sys.executable, "-m", "imgsvc", "serve"], env, tmp_path / "serve.log")
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, server)
        try:
            async with aiohttp.ClientSession() as session:
                status, accepted = await post_csv(session, base, slow_csv(image_server, 8, 1500))
                assert status == 202
                await wait_for(cluster.url, "SELECT count(*) >= 1 FROM images WHERE status = 'done'")
                cluster.stop()
                async with session.get(accepted["status_url"]) as response:
                    assert response.status == 503
                    body = await response.json()
                    assert body["error"] == "unavailable" and response.headers["Retry-After"]
                await asyncio.sleep(3)  # the outage itself: how long the database stays down
                cluster.start()
                final = await wait_for_final(session, accepted["status_url"], seconds=120)
            assert final["status"] == "completed" and final["counts"]["done"] == 16
        finally:
            codes = server.stop()
            output = server.output()
        assert codes == 0 and "Traceback" not in output.split("Application startup complete")[-1], output
    finally:
        cluster.remove()
        shutil.rmtree(root, ignore_errors=True)


async def send_upload(port: int, headers: str, body_chunks: int = 0) -> tuple[bytes, int]:
    """Send a request by hand; stop sending once the server answers. Returns the answer
    and the bytes of body sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(headers.encode())

    async def read_answer() -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        return head + await reader.readexactly(length)

    answer = asyncio.create_task(read_answer())
    sent = 0
    chunk = b"x" * (1 << 20)
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    try:
        for _ in range(body_chunks):
            if answer.done():
                break
            writer.write(framed)
            await writer.drain()
            sent += len(chunk)
    except ConnectionError:
        pass
    data = await asyncio.wait_for(answer, 30)
    writer.close()
    return data, sent


async def test_a_100_mb_upload_is_refused_early_with_flat_memory(
    api: tuple[str, dict[str, str], Process],
) -> None:
    base, _, process = api
    port = int(base.rsplit(":", 1)[1])
    before = rss_kib(process.popen.pid)
    boundary = "imgsvc-test-boundary"
    common = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    )
    answer, _ = await send_upload(port, common + "Content-Length: 104857600\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"IMGSVC_MAX_CSV_BYTES" in answer
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    )
    first = f"{len(preamble):x}\r\n{preamble}\r\n"
    answer, sent = await send_upload(port, common + "Transfer-Encoding: chunked\r\n\r\n" + first, 100)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 100 << 20  # refused before the end
    growth_mib = (rss_kib(process.popen.pid, "VmHWM") - before) / 1024
    assert growth_mib < 20, f"the API grew by {growth_mib:.0f} MiB"


async def test_api_keys_idempotency_and_malformed_forms(
    database_url: str, s3: S3Server, tmp_path: Path, image_server: ImageServer
) -> None:
    key = "k-0123456789abcdef-test"
    port = localdb.free_port()
    env = {**service_env(database_url, s3, tmp_path, port), "IMGSVC_API_KEYS": f"other-key-0000000000,{key}"}
    server = Process([sys.executable, "-m", "imgsvc", "serve"], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # "/" needs a key now; /healthz does not
            try:
                async with aiohttp.ClientSession() as probe, probe.get(base + "/healthz") as response:
                    assert response.status == 200
                    break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline and server.popen.poll() is None, server.output()
                await asyncio.sleep(0.2)
        csv_body = (HEADER + f"1,P,{image_server.url('/img/png_palette_trns.png')}\n").encode()
        async with aiohttp.ClientSession() as anonymous:
            status, body = await post_csv(anonymous, base, csv_body)
            assert status == 401 and body["error"] == "unauthorized"
            async with anonymous.get(base + "/status/00000000-0000-4000-8000-000000000000") as response:
                assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer wrong-key-000000000"}) as wrong:
            status, body = await post_csv(wrong, base, csv_body)
            assert status == 401 and body["message"] == "the API key is not valid"
        auth = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(headers=auth) as session:
            replay = {"Idempotency-Key": "order-2026-11-26-001"}
            first_status, first = await post_csv(session, base, csv_body, headers=replay)
            second_status, second = await post_csv(session, base, csv_body, headers=replay)
            assert (first_status, second_status) == (202, 202)
            assert first["request_id"] == second["request_id"]
            status, body = await post_csv(
                session, base, csv_body + b"2,Q,http://a.test/2.jpg\n", headers=replay
            )
            assert (status, body["error"]) == (422, "idempotency_key_reused")
            form = aiohttp.FormData()
            form.add_field("file", csv_body, filename="a.csv")
            form.add_field("file", csv_body, filename="b.csv")
            async with session.post(base + "/upload", data=form) as response:
                assert response.status == 400
                assert (await response.json())["error"] == "too_many_files"
            await wait_for_final(session, first["status_url"])
        assert await query(database_url, "SELECT count(*) FROM requests") == 1
        assert await query(database_url, "SELECT count(*) FROM images") == 1
    finally:
        assert_clean_exit(server)
    assert key not in server.output()

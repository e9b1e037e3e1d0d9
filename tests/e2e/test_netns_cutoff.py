"""A host cut off from the database mid-batch: a worker in a network namespace of its
own, the servers and another worker on this side of a veth pair, and the link taken
down while the first worker's images are in flight. Root only (skipped elsewhere).

The link stays down until the other host has finished the batch (10-25 s here). The
cut-off worker's connections have no keepalive that soon, so its statements wait for
the link, and its procrastinate run goes on; when the link returns, its runs of the
jobs taken over end and say so, and it takes new work. With ``tcp_user_timeout`` in
DATABASE_URL, the link stays down until the worker's heartbeat has failed: its run
stops, and it starts again once the link is back.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook

from imgsvc import localdb, migrate
from tests import netns
from tests.conftest import WEBHOOK_SECRET, eventually
from tests.e2e.processes import (
    Process,
    assert_clean_exit,
    post_csv,
    service_env,
    wait_for_final,
    wait_until_up,
)
from tests.servers import ImageServer, S3Server, WebhookReceiver

pytestmark = pytest.mark.timeout(300)

HEADER = "S. No.,Product Name,Input Image Urls\n"
FILES = ["png_palette_trns.png", "gif_animated_loop3.gif", "jpeg_cmyk_adobe_no-icc.jpg"]
STALLED_SECONDS = 3


class Servers:
    """PostgreSQL, the S3 server, the origin and the webhook receiver, on the address that
    both hosts reach: this side's end of the veth pair."""

    def __init__(self, host: netns.Host, root: Path) -> None:
        self.cluster = localdb.LocalPostgres(root / "pg", fast=True, listen=[host.address])
        self.s3 = S3Server(root / "s3", host=host.address)
        self.origin = ImageServer(host=host.address)
        self.receiver = WebhookReceiver(host=host.address)
        self.host = host
        self._started: list[S3Server | ImageServer | WebhookReceiver] = []

    def start(self) -> None:
        self.cluster.start()
        with (self.cluster.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.host.network} trust\n")
        self.cluster.execute("SELECT pg_reload_conf()")
        for server in (self.s3, self.origin, self.receiver):
            server.start()
            self._started.append(server)

    def stop(self) -> None:
        """Stop what was started, the cluster last."""
        for server in reversed(self._started):
            server.stop()
        self.cluster.remove()

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{self.host.address}:{self.cluster.port}/{localdb.DATABASE}"


@pytest.fixture
def host() -> Iterator[netns.Host]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with netns.separate_host() as made:
        yield made


@pytest.fixture
def servers(host: netns.Host) -> Iterator[Servers]:
    root = Path(tempfile.mkdtemp(prefix="imgsvc-netns-"))
    os.chmod(root, 0o755)  # noqa: S103 - the cluster runs as another user
    running = Servers(host, root)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


async def fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def batch_csv(origin: ImageServer, count: int, ms: int) -> bytes:
    """``count`` products of one slow image each, every URL its own source."""
    rows = "".join(
        f"{n},P{n},{origin.url(f'/slow/{ms}/{FILES[n % len(FILES)]}?source={n}')}\n" for n in range(count)
    )
    return (HEADER + rows).encode()


def hook_events(receiver: WebhookReceiver, hook: str) -> list[str]:
    """The request id of every event posted to ``hook``, each checked against its signature."""
    return [
        Webhook(WEBHOOK_SECRET).verify(body, headers)["request_id"] for headers, body in receiver.posts(hook)
    ]


@pytest.mark.parametrize("user_timeout", [None, 5000], ids=["defaults", "tcp_user_timeout"])
async def test_a_host_cut_off_mid_batch_loses_nothing_and_does_nothing_twice(
    host: netns.Host, servers: Servers, tmp_path: Path, user_timeout: int | None
) -> None:
    # With tcp_user_timeout (ms) in DATABASE_URL, the cut-off worker gives up: its
    # heartbeat fails, procrastinate stops its run, and imgsvc starts it again.
    url = servers.database_url + (f"?tcp_user_timeout={user_timeout}" if user_timeout else "")
    await migrate.apply(url)
    hook = f"/flaky/{uuid.uuid4().hex}/0"
    port = localdb.free_port()
    env = {
        **service_env(url, servers.s3, tmp_path, port),
        "IMGSVC_MAX_ROWS": "1000",
        "IMGSVC_STALLED_SECONDS": str(STALLED_SECONDS),
        "IMGSVC_SHUTDOWN_SECONDS": "2",
        "IMGSVC_IMAGES_PER_JOB": "2",
        "IMGSVC_WORKER_CONCURRENCY": "4",
        # Downloads cut off mid-way wait for the link (a pause of up to 3x this) rather
        # than fail: the test is of the database's side of things.
        "IMGSVC_CONNECT_TIMEOUT": "60",
        "WEBHOOK_URL": servers.receiver.url(hook),
    }
    base = f"http://127.0.0.1:{port}"
    api = Process([sys.executable, "-m", "imgsvc", "serve", "--no-worker"], env, tmp_path / "api.log")
    processes = [api]
    try:
        wait_until_up(base, api)
        # The worker in the namespace alone first, so that it holds images when the other starts.
        cut_off = Process(host.command([sys.executable, "-m", "imgsvc", "worker"]), env, tmp_path / "cut.log")
        processes.append(cut_off)
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(session, base, batch_csv(servers.origin, 24, 3000))
            assert status == 202, accepted
            rid = accepted["request_id"]
            cut_worker = await eventually(
                lambda: fetchval(url, "SELECT min(id) FROM procrastinate_workers"),
                what="the worker in the namespace registered",
                timeout=30,
            )
            await eventually(
                lambda: fetchval(url, "SELECT count(*) >= 4 FROM images WHERE status = 'processing'"),
                what="the worker in the namespace had images in flight",
                timeout=30,
            )
            other = Process([sys.executable, "-m", "imgsvc", "worker"], env, tmp_path / "other.log")
            processes.append(other)
            await eventually(
                lambda: fetchval(url, "SELECT count(*) = 2 FROM procrastinate_workers"),
                what="the worker on this side registered",
                timeout=30,
            )
            host.cut()
            cut_at = time.monotonic()
            # What the namespace's worker held when its link went: its jobs, their images.
            held = await fetchval(
                url,
                "SELECT array_agg(id ORDER BY id) FROM procrastinate_jobs"
                " WHERE worker_id = $1 AND status = 'doing' AND task_name = 'process_images'",
                cut_worker,
            )
            assert held, "the worker in the namespace held no job when it was cut off"
            in_flight = await fetchval(
                url,
                "SELECT array_agg(DISTINCT i.id) FROM procrastinate_jobs j,"
                " jsonb_array_elements(j.args->'image_ids') a, images i WHERE i.id = a::bigint"
                " AND j.id = ANY($1::bigint[]) AND i.status IN ('queued', 'processing')",
                held,
            )
            assert in_flight, "none of the cut-off worker's images was in flight"
            print(f"cut {host.namespace} off holding jobs {held}, images {in_flight} in flight")

            # The other host finishes the batch, the cut-off one's images included.
            final = await wait_for_final(session, accepted["status_url"], seconds=120)
            assert final["status"] == "completed" and final["counts"]["done"] == 24
            await eventually(lambda: hook_events(servers.receiver, hook), what="the webhook was delivered")
            for job in held:
                assert f"retried job {job} (process_images) of a stalled worker" in other.output()
            taken_over = await fetchval(
                url, "SELECT bool_and(attempts >= 2) FROM images WHERE id = ANY($1::bigint[])", in_flight
            )
            assert taken_over, "the cut-off worker's images did not run again"
            completed_at = await fetchval(
                url, "SELECT completed_at FROM requests WHERE id = $1", uuid.UUID(rid)
            )

            if user_timeout:
                await eventually(
                    lambda: "Side task update_heartbeats failed" in cut_off.output(),
                    what="the cut-off worker's heartbeat failed",
                    timeout=120,
                    interval=0.5,
                )

            # The link returns: the cut-off worker's runs of those jobs end, and say so.
            host.restore()
            print(f"link restored after {time.monotonic() - cut_at:.1f} s")
            if user_timeout:
                await eventually(
                    lambda: (
                        "the worker stopped (its database connection failed); starting it again"
                        in cut_off.output()
                    ),
                    what="the cut-off worker's run stopped, to start again",
                    timeout=60,
                    interval=0.5,
                )
            await eventually(
                lambda: all(
                    f"job {job} (process_images) had been taken over, or ended, by another worker"
                    in cut_off.output()
                    for job in held
                ),
                what="the cut-off worker's runs ended and said they had been taken over",
                timeout=120,
                interval=0.5,
            )
            # It has recovered: with the other worker stopped, it alone runs a new request.
            assert_clean_exit(other)
            processes.remove(other)
            fast = "".join(f"{n},Q{n},{servers.origin.url(f'/img/{FILES[n]}?again')}\n" for n in range(3))
            status, second = await post_csv(session, base, (HEADER + fast).encode())
            assert status == 202, second
            again = await wait_for_final(session, second["status_url"], seconds=60)
            assert again["status"] == "completed"
            await eventually(
                lambda: len(hook_events(servers.receiver, hook)) >= 2, what="the second webhook was delivered"
            )
        assert f"request {second['request_id']} finished" in cut_off.output()

        # Nothing was done twice where it would show.
        logs = cut_off.output() + other.output()
        assert logs.count(f"request {rid} finished") == 1
        assert logs.count("Starting job finish_request") == 2  # one for each request
        assert sorted(hook_events(servers.receiver, hook)) == sorted([rid, second["request_id"]])
        assert await fetchval(url, "SELECT count(*) FROM images WHERE request_id = $1", uuid.UUID(rid)) == 24
        assert await fetchval(url, "SELECT count(*) FROM images WHERE status <> 'done'") == 0
        assert await fetchval(url, "SELECT count(*) FROM webhook_deliveries") == 2
        assert await fetchval(url, "SELECT max(attempts) FROM webhook_deliveries") == 1
        assert (
            await fetchval(url, "SELECT completed_at FROM requests WHERE id = $1", uuid.UUID(rid))
            == completed_at
        )
        left = await fetchval(
            url,
            "SELECT count(*) FROM procrastinate_jobs"
            " WHERE status IN ('todo', 'doing') AND task_name <> 'maintenance'",
        )
        assert left == 0
        listed = servers.s3.client().list_objects_v2(Bucket=servers.s3.bucket, Prefix="img/")
        assert len(listed["Contents"]) == len(FILES)  # one object per distinct output
        assert "Task exception was never retrieved" not in cut_off.output(), cut_off.output()
        assert_clean_exit(cut_off, api)
        processes.clear()
    finally:
        for process in processes:
            process.popen.kill()
            process.popen.wait(10)

"""`imgsvc worker --processes N`, as processes: the supervisor starts again a child that
is killed and the batch finishes; SIGTERM and Ctrl-C stop every child with today's
guarantees; children die with a supervisor killed outright; logs and metrics name each
process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from imgsvc import localdb
from tests.e2e.processes import (
    Process,
    assert_clean_exit,
    post_csv,
    service_env,
    serving,
    wait_for_final,
    wait_until_up,
)
from tests.e2e.test_faults import query, slow_csv, wait_for
from tests.servers import ImageServer, S3Server


@pytest.fixture
def api(database_url: str, s3: S3Server, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The API alone (tests start their own workers); yields its URL and environment."""
    env = {
        **service_env(database_url, s3, tmp_path, localdb.free_port()),
        "IMGSVC_STALLED_SECONDS": "2",
        "IMGSVC_SHUTDOWN_SECONDS": "1",
        # A job an image, so that every worker process holds some of a small request.
        "IMGSVC_IMAGES_PER_JOB": "1",
    }
    with serving(env, tmp_path / "api.log", "--no-worker") as (base, _):
        yield base, env


def workers(env: dict[str, str], log: Path, processes: int = 2, *, own_session: bool = False) -> Process:
    args = [sys.executable, "-m", "imgsvc", "worker", "--processes", str(processes)]
    return Process(args, env, log, own_session=own_session)


def children(pid: int) -> set[int]:
    """The live children of ``pid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def wait_for_children(pid: int, count: int, seconds: float = 30) -> set[int]:
    deadline = time.monotonic() + seconds
    while len(found := children(pid)) != count:
        assert time.monotonic() < deadline, f"{len(found)} children of {pid}, not {count}"
        time.sleep(0.1)
    return found


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def wait_until_gone(pids: set[int], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while left := {pid for pid in pids if alive(pid)}:
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.1)


def metrics(port: int, process: Process, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
                text: str = response.read().decode()
                return text
        except OSError:
            assert process.popen.poll() is None, process.output()
            assert time.monotonic() < deadline, f"no metrics on port {port}: {process.output()}"
            time.sleep(0.2)


async def test_a_killed_child_is_started_again_and_the_batch_finishes(
    api: tuple[str, dict[str, str]], database_url: str, image_server: ImageServer, tmp_path: Path
) -> None:
    base, env = api
    port = localdb.free_port()
    while localdb.free_port() == port + 1:  # pragma: no cover (the next port must be free too)
        port = localdb.free_port()
    env = env | {"IMGSVC_LOG_FORMAT": "json", "IMGSVC_METRICS_PORT": str(port)}
    supervisor = workers(env, tmp_path / "workers.log")
    try:
        first = wait_for_children(supervisor.popen.pid, 2)
        # One port a child: worker-1 on the port given, worker-2 on the next, each sample labelled.
        assert 'process="worker-1"' in metrics(port, supervisor)
        assert 'process="worker-2"' in metrics(port + 1, supervisor)
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(session, base, slow_csv(image_server, 12, 2000))
            assert status == 202
            await wait_for(database_url, "SELECT count(*) >= 4 FROM images WHERE status = 'processing'")
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while (now := children(supervisor.popen.pid)) == first or len(now) != 2:
                assert time.monotonic() < deadline, supervisor.output()
                time.sleep(0.1)
            assert victim not in now
            final = await wait_for_final(session, accepted["status_url"], seconds=120)
    finally:
        assert_clean_exit(supervisor)
    assert final["status"] == "completed" and final["counts"]["done"] == 24
    assert await query(database_url, "SELECT count(*) FROM images WHERE output_key IS NULL") == 0
    assert await query(database_url, "SELECT count(DISTINCT output_key) FROM images") == 3
    lines = [json.loads(line) for line in supervisor.output().splitlines() if line.startswith("{")]
    restarted = [line for line in lines if "was killed by SIGKILL" in line["message"]]
    assert restarted and restarted[0]["process"] == "supervisor", supervisor.output()
    # Every line names its process: the supervisor and both slots logged.
    assert {line.get("process") for line in lines} == {"supervisor", "worker-1", "worker-2"}
    assert all("process" in line for line in lines)
    assert "stalled worker" in supervisor.output()  # the killed child's jobs were taken over


async def test_sigterm_stops_every_child_and_their_images_are_queued_again(
    api: tuple[str, dict[str, str]], database_url: str, image_server: ImageServer, tmp_path: Path
) -> None:
    base, env = api
    supervisor = workers(env, tmp_path / "first.log")
    pids = wait_for_children(supervisor.popen.pid, 2)
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, base, slow_csv(image_server, 6, 8000))
        assert status == 202
        await wait_for(database_url, "SELECT count(*) >= 3 FROM images WHERE status = 'processing'")
        assert_clean_exit(supervisor)  # SIGTERM; exit 0, no traceback
        wait_until_gone(pids, 1)  # they ended before the supervisor did
        assert await query(database_url, "SELECT count(*) FROM images WHERE status = 'processing'") == 0
        interrupted = await query(
            database_url, "SELECT count(*) FROM images WHERE error LIKE 'interrupted:%'"
        )
        assert isinstance(interrupted, int) and interrupted >= 1
        output = supervisor.output()
        assert "starting it again" not in output, output  # a stop is not a death
        second = workers(env, tmp_path / "second.log")
        try:
            final = await wait_for_final(session, accepted["status_url"], seconds=120)
        finally:
            assert_clean_exit(second)
    assert final["status"] == "completed" and final["counts"]["done"] == 12


def test_ctrl_c_stops_them_all(api: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    _, env = api
    supervisor = workers(env, tmp_path / "workers.log", 3, own_session=True)
    pids = wait_for_children(supervisor.popen.pid, 3)
    deadline = time.monotonic() + 30
    while supervisor.output().count("worker started") < 3:
        assert time.monotonic() < deadline, supervisor.output()
        time.sleep(0.1)
    os.killpg(supervisor.popen.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process
    assert supervisor.popen.wait(30) == 0, supervisor.output()
    wait_until_gone(pids, 1)
    output = supervisor.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "starting it again" not in output, output


def test_children_die_with_a_supervisor_killed_outright(
    api: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    _, env = api
    supervisor = workers(env, tmp_path / "workers.log")
    pids = wait_for_children(supervisor.popen.pid, 2)
    supervisor.popen.send_signal(signal.SIGKILL)
    supervisor.popen.wait(10)
    wait_until_gone(pids)  # orphans would be adopted and live on


async def test_the_api_behind_several_uvicorn_workers(
    database_url: str, s3: S3Server, image_server: ImageServer, tmp_path: Path
) -> None:
    port = localdb.free_port()
    env = service_env(database_url, s3, tmp_path, port)
    args = [
        "--factory",
        "imgsvc.web:from_env",
        "--workers",
        "2",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    api = Process([sys.executable, "-m", "uvicorn", *args], env, tmp_path / "uvicorn.log")
    worker = workers(env, tmp_path / "worker.log", 1)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, api)
        # Two processes serve it (multiprocessing's resource tracker may be a third child).
        assert len(children(api.popen.pid)) >= 2
        url = image_server.url("/img/png_palette_trns.png")
        body = f'S. No.,Product Name,Input Image Urls\n1,P,"{url},{url}?2"\n2,Q,{url}?3\n'.encode()
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(session, base, body)
            assert status == 202, accepted
            final = await wait_for_final(session, accepted["status_url"], seconds=60)
    finally:
        assert_clean_exit(api, worker)
    assert final["status"] == "completed" and final["counts"]["done"] == 3


def test_a_process_count_that_is_not_one_or_more_is_refused_in_words() -> None:
    for bad in ("0", "-2", "many"):
        done = subprocess.run(
            [sys.executable, "-m", "imgsvc", "worker", "--processes", bad],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 2
        assert f"--processes: expected a whole number above 0, got {bad!r}" in done.stderr
        assert "Traceback" not in done.stderr

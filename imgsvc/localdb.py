"""A private PostgreSQL cluster in a folder, for `make run` and the tests.

Used only when DATABASE_URL is unset. The binaries come from the machine
(pg_config, /usr/lib/postgresql/*/bin, PATH) or, where it has none, from the
`pgserver` wheel (the ``local`` extra: ``pip install 'imgsvc[local]'``), whose
binaries we run directly. PostgreSQL refuses to run as
root, so as root the cluster belongs to, and runs as, the `nobody` user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from imgsvc import errors

DATABASE = "imgsvc"
_UNPRIVILEGED = "nobody"


def find_bindir(candidates: Sequence[Path] | None = None) -> Path:
    """The folder of a PostgreSQL installation's initdb, pg_ctl and postgres, among
    ``candidates`` (by default those of this machine and the pgserver wheel)."""
    for candidate in _installations() if candidates is None else candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise errors.ImgsvcError(
        "no PostgreSQL binaries for a local database: pip install 'imgsvc[local]'"
        " (or install PostgreSQL), or set DATABASE_URL"
    )


def _installations() -> list[Path]:
    """Where PostgreSQL's binaries may be: pg_config's answer, Debian's folders, PATH,
    then the pgserver wheel (the ``local`` extra)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    return candidates


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalPostgres:
    """A cluster in ``root`` (data/, run/, log): started on enter, stopped on exit."""

    def __init__(
        self,
        root: Path,
        *,
        fast: bool = False,
        port: int | None = None,
        listen: Sequence[str] = (),
        settings: Sequence[str] = (),
    ) -> None:
        self.root = root.absolute()
        self.settings = list(settings)  # more server settings, "name=value"
        self.data = self.root / "data"
        self.run_dir = self.root / "run"
        self.log = self.root / "postgres.log"
        self.fast = fast
        self.port = port
        self.listen = ["127.0.0.1", *listen]  # addresses besides loopback, for other hosts
        self.bindir = find_bindir()
        self.started_here = False
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam(_UNPRIVILEGED)

    @property
    def url(self) -> str:
        """The URL of the imgsvc database in this cluster."""
        return self.url_of(DATABASE)

    def _run(self, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        result: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            list(args), capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, **kwargs
        )
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise errors.ImgsvcError(f"{Path(args[0]).name} failed: {' '.join(detail)} (log: {self.log})")
        return result

    def _prepare_folders(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        if self._user is None:
            return
        for path in [self.root, self.run_dir, *self.root.rglob("*")]:
            os.chown(path, self._user.pw_uid, self._user.pw_gid, follow_symlinks=False)
        os.chmod(self.root, 0o755)  # noqa: S103 - the server user must traverse it
        for parent in self.root.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise errors.ImgsvcError(
                    f"{parent} is not searchable by the '{_UNPRIVILEGED}' user that runs "
                    "PostgreSQL for root; choose another IMGSVC_DATA_DIR or set DATABASE_URL"
                )

    def _running_port(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return None
        status = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"], check=False)
        if status.returncode != 0:
            return None
        lines = pid_file.read_text().splitlines()
        return int(lines[3]) if len(lines) > 3 else None

    def start(self) -> str:
        """Create the cluster if needed, start it, make the database; return its URL."""
        self._prepare_folders()
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ]
            )
        running = self._running_port()
        if running is not None:
            self.port = running
        else:
            self.port = self.port or free_port()
            options = [
                f"-p {self.port}",
                f"-k {self.run_dir}",
                f"-c listen_addresses={','.join(self.listen)}",
                "-c max_connections=300",
            ]
            if self.fast:
                options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            options += [f"-c {setting}" for setting in self.settings]
            self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    " ".join(options),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            )
            self.started_here = True
        self._create_database()
        return self.url

    def execute(self, statement: str, *, database: str = "postgres", check: bool = True) -> str:
        """Run one SQL statement with psql; return what it printed."""
        psql = [
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-tA",
            "-c",
            statement,
        ]
        return self._run(psql, check=check).stdout.strip()

    def url_of(self, database: str) -> str:
        """The URL of another database in this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _create_database(self) -> None:
        for _ in range(50):
            found = self._run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], check=False
            )
            if found.returncode == 0:
                break
            time.sleep(0.1)
        if self.execute(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
            self.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self) -> None:
        """Stop the cluster if this object started it."""
        if self.started_here:
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], check=False
            )
            self.started_here = False

    def remove(self) -> None:
        """Stop the cluster and delete its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running(root: Path, *, fast: bool = False) -> Iterator[LocalPostgres]:
    """Start the cluster in ``root`` for the duration of the block."""
    cluster = LocalPostgres(root, fast=fast)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()

"""``imgsvc worker --processes N``: N worker processes under one supervisor.

One worker process has one event loop, and the loop's own work (downloads, S3 PUTs,
SQL, the queue) bounds how many images a second it handles, whatever the cores. The
supervisor runs N of them, each ``python -m imgsvc worker`` started afresh
(``subprocess``: nothing of the supervisor's state is shared or forked), and:

- starts again a child that dies, after a delay that doubles while it keeps dying
  young (1 s, up to 30 s);
- on SIGTERM or SIGINT, sends SIGTERM to every child and waits: each stops as a lone
  worker does (running images get ``IMGSVC_SHUTDOWN_SECONDS``, the rest are queued
  again), and one still running well after that is killed;
- dies with its children: each asks the kernel to kill it when its parent dies
  (``PR_SET_PDEATHSIG``; elsewhere a thread watches the parent). A supervisor killed
  with SIGKILL is then a worker killed, whose jobs the other workers take over after
  ``IMGSVC_STALLED_SECONDS``.

The budgets of one ``imgsvc worker`` hold for all its processes together: each has
its ``1/N`` share (``share``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from imgsvc import settings

logger = logging.getLogger("imgsvc.supervisor")

SUPERVISOR = "supervisor"  # the supervisor's name in logs

# How long past IMGSVC_SHUTDOWN_SECONDS a stopping child may take (closing its pools,
# requeueing its images) before it is killed.
STOP_GRACE_SECONDS = 30.0
RESTART_FIRST_DELAY = 1.0
RESTART_MAX_DELAY = 30.0
RESTART_RESET_AFTER = 60.0  # a child that lived this long starts the delays afresh
_POLL_SECONDS = 0.2


# Cores one process keeps busy before its event loop is the limit, on the images that
# need the loop most: tiny ones, whose codec work is nothing (the loop was 2.8 of the
# worker's 5.2 CPU ms an image; on 2 MP photos 5.0 of 33.9). docs/performance.md has
# the measurement.
CORES_PER_PROCESS = 2


def default_processes(usable_cores: int) -> int:
    """The worker processes ``imgsvc worker`` runs unless told: one per
    ``CORES_PER_PROCESS`` usable cores, rounded up (1 on 1 or 2 cores, 8 on 16)."""
    return max(1, math.ceil(usable_cores / CORES_PER_PROCESS))


def name(slot: int) -> str:
    """A child's name in logs and metrics: ``worker-1`` … ``worker-N``."""
    return f"worker-{slot}"


# The settings that are budgets of the machine, divided among the processes: bytes
# rounded down (the sum never passes the budget), counts rounded up (at least one each).
_BYTES = ("image_memory", "source_memory")
_COUNTS = (
    "download_concurrency",
    "download_per_host",
    "image_concurrency",
    "large_image_concurrency",
    "upload_concurrency",
    "worker_concurrency",
)


def share(config: settings.Settings, processes: int) -> settings.Settings:
    """One process's settings, of a worker of ``processes``: its share of each budget."""
    if processes <= 1:
        return config
    changes: dict[str, int] = {field: getattr(config, field) // processes for field in _BYTES}
    changes |= {field: max(1, math.ceil(getattr(config, field) / processes)) for field in _COUNTS}
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


_PR_SET_PDEATHSIG = 1


def follow_parent(parent: int) -> None:
    """Die with the supervisor ``parent``: SIGKILL when it dies, or at once if it
    already has (it died while this process started)."""
    armed = False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:
        os._exit(1)
    if not armed:  # not Linux: watch for the parent to go
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass(slots=True)
class _Child:
    slot: int
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = RESTART_FIRST_DELAY
    due: float = 0.0  # when to start it (again), while it is not running


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Runs ``command(slot)`` for slots 1 … ``processes`` until a SIGTERM or SIGINT."""

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        processes: int,
        stop_seconds: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = command
        self.env = dict(env) if env is not None else None
        self.children = [_Child(slot) for slot in range(1, processes + 1)]
        self.stop_seconds = stop_seconds
        self._stopping: int | None = None  # the signal that asked for the stop

    def _ask_stop(self, signum: int, frame: object) -> None:
        self._stopping = signum

    def _start(self, child: _Child) -> None:
        child.popen = subprocess.Popen(list(self.command(child.slot)), env=self.env)
        child.started = time.monotonic()
        logger.info("%s started (pid %s)", name(child.slot), child.popen.pid)

    def _reap(self, child: _Child, now: float) -> None:
        assert child.popen is not None
        code = child.popen.returncode
        lived = now - child.started
        if lived >= RESTART_RESET_AFTER:
            child.delay = RESTART_FIRST_DELAY
        child.due = now + child.delay
        logger.warning(
            "%s (pid %s) %s after %.0f s; starting it again in %.0f s",
            name(child.slot),
            child.popen.pid,
            _exit_text(code),
            lived,
            child.delay,
        )
        child.delay = min(child.delay * 2, RESTART_MAX_DELAY)
        child.popen = None

    def run(self) -> int:
        """Supervise until a stop signal; then stop every child. The exit status: 0 if
        every child stopped by itself, 1 if one had to be killed."""
        previous = {s: signal.signal(s, self._ask_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            logger.info("supervising %s worker processes", len(self.children))
            while self._stopping is None:
                now = time.monotonic()
                for child in self.children:
                    if child.popen is None and now >= child.due:
                        self._start(child)
                    elif child.popen is not None and child.popen.poll() is not None:
                        self._reap(child, now)
                time.sleep(_POLL_SECONDS)
            return self._stop_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_all(self) -> int:
        running = [child.popen for child in self.children if child.popen is not None]
        logger.info(
            "%s: stopping %s worker processes",
            signal.Signals(self._stopping or signal.SIGTERM).name,
            len(running),
        )
        for popen in running:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_seconds + STOP_GRACE_SECONDS
        killed = 0
        for popen in running:
            try:
                popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("pid %s did not stop in time: killed", popen.pid)
                popen.kill()
                popen.wait()
                killed += 1
        failed = [p for p in running if p.returncode not in (0, -signal.SIGTERM)]
        for popen in failed:
            logger.warning("pid %s %s while stopping", popen.pid, _exit_text(popen.returncode))
        logger.info("every worker process has stopped")
        return 1 if killed else 0


def child_command(processes: int, slot: int) -> list[str]:
    """The command of one child: ``imgsvc worker`` as one of ``processes`` (the
    supervisor has applied or checked the schema before it starts any)."""
    return [
        sys.executable,
        "-m",
        "imgsvc",
        "worker",
        "--processes",
        str(processes),
        "--child-of",
        str(os.getpid()),
        "--slot",
        str(slot),
    ]

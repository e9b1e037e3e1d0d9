"""Process priority: image work yields the CPU to event loops, PostgreSQL and an API on
the same machine, by nice levels per thread and, where Linux schedules by session
(autogroup), per session."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

logger = logging.getLogger("imgsvc.priority")


def lower_priority(steps: int) -> None:
    """Make the calling thread ``steps`` nice levels lower. Meant for the image threads:
    the libvips threads they start inherit it, so image work takes the CPU that event
    loops, PostgreSQL and an API on the same machine leave, instead of delaying them."""
    if steps <= 0:
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + steps)


_AUTOGROUP = "/proc/self/autogroup"
_AUTOGROUP_ENABLED = "/proc/sys/kernel/sched_autogroup_enabled"


def lower_session_priority(steps: int) -> bool:
    """Make this process's session at least ``steps`` nice levels lower; whether it did.

    Where Linux schedules by session (autogroup, on by default in most distributions for
    processes outside a CPU cgroup: services started in sessions of their own, as systemd
    and the benchmark do), each session gets an equal share of the CPU, and a thread's
    nice level only orders it among its own session's threads. The image threads' nice
    level would then not let an API or PostgreSQL beside the worker come first. Meant for
    processes that run images and no API (IMGSVC_WORKER_SESSION_NICE); the image threads
    still run their own levels lower than the event loop within the session. Only a
    process that leads its own session (a service started by systemd or by the
    benchmark) does it: in a terminal's or a test runner's session it would lower
    everything else there too."""
    if steps <= 0 or os.getsid(0) != os.getpid():
        return False
    try:
        with open(_AUTOGROUP_ENABLED) as enabled:
            if enabled.read().strip() != "1":
                return False
        with open(_AUTOGROUP) as group:
            current = int(group.read().rsplit("nice", 1)[1])
        if current < steps:
            with open(_AUTOGROUP, "w") as group:
                group.write(str(min(19, steps)))
    except (OSError, ValueError, IndexError):
        return False
    logger.info("this process's session is at least %s nice levels lower (sched_autogroup)", steps)
    return True

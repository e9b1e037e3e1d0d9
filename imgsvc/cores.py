"""The cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

``os.cpu_count()`` is the host's count. A container limited to two CPUs of a 64-core
host (``docker run --cpus 2``, a Kubernetes CPU limit) sees 64 there, and a process
pinned with ``taskset`` sees them all too. What it may really use is the smaller of
its affinity mask and its quota, read from cgroup v2 (``cpu.max``) or v1
(``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``). A fractional quota is rounded
down, and never below one core: a process given 1.5 cores that ran two busy event
loops would be throttled every period.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# Where the v1 cpu controller is mounted under the cgroup root, by distribution.
_V1_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def usable_cores(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The whole cores this process may use: affinity, capped by its cgroup's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root, own_cgroups(proc_cgroup))
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def own_cgroups(proc_cgroup: Path = PROC_CGROUP) -> dict[str, str]:
    """This process's cgroup path by controller, from /proc/self/cgroup: ``""`` for
    cgroup v2's unified hierarchy, ``"cpu"`` for v1's cpu controller; none if unreadable."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def cpu_quota(cgroup_root: Path, own: dict[str, str] | None = None) -> float | None:
    """The CPU quota in cores of the cgroup at ``own`` (paths as ``own_cgroups`` gives
    them) under ``cgroup_root`` and of every cgroup above it, the smallest; None if
    there is none. cgroup v2 is read first, then v1."""
    own = own or {}
    quotas = [
        q for d in _ancestors(cgroup_root, own.get("", "/")) if (q := _v2_quota(d / "cpu.max")) is not None
    ]
    for name in _V1_DIRS:
        mount = cgroup_root / name
        if mount.is_dir():
            quotas += [q for d in _ancestors(mount, own.get("cpu", "/")) if (q := _v1_quota(d)) is not None]
            break
    return min(quotas) if quotas else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup directory of ``path`` under ``mount`` and each one above it, up to the
    mount itself. Inside a container the path often names a cgroup of the host that the
    container does not see: then the mount alone (the container's own cgroup)."""
    leaf = mount / path.strip("/")
    if not leaf.is_dir():
        return [mount]
    found = [leaf]
    while found[-1] != mount and mount in found[-1].parents:
        found.append(found[-1].parent)
    return found


def _v2_quota(cpu_max: Path) -> float | None:
    """``cpu.max`` holds ``$MAX $PERIOD``, ``max`` for no limit."""
    try:
        fields = cpu_max.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 for no limit."""
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None
    return q / p

"""CPU time and memory of process trees, read from /proc (Linux only).

CPU of a tree = utime + stime + cutime + cstime of every live process in it: a child
that exited and was reaped has its time in its parent's cutime/cstime, so the sum
over the live tree counts every process that ever ran in it, once.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return text[text.rindex(")") + 2 :].split()


def _own_and_reaped_ticks(fields: list[str]) -> int:
    # After the command name: [0] state, [1] ppid, ... [11] utime, [12] stime,
    # [13] cutime, [14] cstime (fields 14-17 of proc(5)).
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def children_map() -> dict[int, list[int]]:
    """Each live process's children, by parent pid: one scan of /proc, for many trees."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree(pid: int, children: Mapping[int, list[int]] | None = None) -> list[int]:
    """``pid`` and all its live descendants."""
    kids = children if children is not None else children_map()
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(kids.get(current, []))
    return found


def cpu_seconds(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree."""
    kids = children_map()
    result: dict[str, float] = {}
    for name, root in roots.items():
        ticks = 0
        for pid in tree(root, kids):
            fields = _stat_fields(pid)
            if fields is not None:
                ticks += _own_and_reaped_ticks(fields)
        result[name] = ticks / _TICKS
    return result


def status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: write 5 to its clear_refs);
    False when that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def pss_kib(pid: int) -> int | None:
    """Proportional set size: resident memory with shared pages split among their users."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def tree_pss_kib(pid: int) -> int:
    """Memory of a process tree, shared pages (PostgreSQL's shared buffers) counted once."""
    return sum(pss_kib(p) or 0 for p in tree(pid))


@dataclasses.dataclass
class _Peaks:
    overall: dict[str, int] = dataclasses.field(default_factory=dict)
    window: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: int = 0


class RssSampler:
    """Samples VmRSS of some processes every ``interval`` seconds on its own thread.

    ``window()`` returns the peaks since the previous call (one phase of the run);
    ``overall()`` the peaks since the start. Names in ``trees`` are whole process trees,
    measured by PSS every tenth sample (reading smaps costs more than status).
    """

    def __init__(self, pids: Mapping[str, int], *, interval: float = 0.05, trees: Iterable[str] = ()) -> None:
        self.pids = dict(pids)
        self.trees = set(trees)
        self._tick = 0
        self.interval = interval
        self._peaks = _Peaks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        values: dict[str, int] = {}
        self._tick += 1
        for name, pid in self.pids.items():
            if name not in self.trees:
                value = status_kib(pid, "VmRSS")
            elif self._tick % 10 == 1:
                value = tree_pss_kib(pid)
            else:
                continue
            if value is not None:
                values[name] = value
        with self._lock:
            self._peaks.samples += 1
            for name, value in values.items():
                self._peaks.overall[name] = max(self._peaks.overall.get(name, 0), value)
                self._peaks.window[name] = max(self._peaks.window.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        """Start sampling."""
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (waits for the thread, at most a second)."""
        self._stop.set()
        self._thread.join(1.0)

    def window(self) -> dict[str, int]:
        """Peak KiB per process since the last call."""
        self._sample()
        with self._lock:
            peaks, self._peaks.window = self._peaks.window, {}
        return peaks

    def overall(self) -> dict[str, int]:
        """Peak KiB per process since start."""
        with self._lock:
            return dict(self._peaks.overall)

    @property
    def samples(self) -> int:
        """How many samples were taken."""
        return self._peaks.samples


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds all cores of the machine spent busy, and stolen by the hypervisor."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS, steal / _TICKS


def self_cpu_seconds() -> float:
    """CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """The machine's CPU use over an interval, split into ours (the process trees in
    ``roots`` and this process) and everyone else's, so a noisy machine shows."""

    def __init__(self, roots: Mapping[str, int] | None = None) -> None:
        self.roots = dict(roots or {})
        self._start: tuple[float, float, float, dict[str, float], float] | None = None

    def start(self) -> None:
        """Begin the interval."""
        busy, steal = machine_cpu_seconds()
        self._start = (time.monotonic(), busy, steal, cpu_seconds(self.roots), self_cpu_seconds())

    def stop(self) -> dict[str, Any]:
        """End it: wall seconds, per-tree CPU, and the machine's busy, ours and foreign CPU."""
        assert self._start is not None, "start() first"
        wall0, busy0, steal0, trees0, self0 = self._start
        busy, steal = machine_cpu_seconds()
        trees = cpu_seconds(self.roots)
        tree_delta = {name: trees[name] - trees0.get(name, 0.0) for name in trees}
        harness = self_cpu_seconds() - self0
        wall = time.monotonic() - wall0
        ours = sum(tree_delta.values()) + harness
        foreign = max(0.0, (busy - busy0) - ours)
        return {
            "wall_seconds": round(wall, 4),
            "trees": tree_delta,
            "harness_cpu_seconds": round(harness, 4),
            "machine_busy_seconds": round(busy - busy0, 3),
            "steal_seconds": round(steal - steal0, 3),
            "foreign_cpu_seconds": round(foreign, 3),
            "foreign_cores": round(foreign / wall, 3) if wall else 0.0,
        }

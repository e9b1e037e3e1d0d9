"""CPU time and memory of process trees, read from /proc (Linux only).

CPU of a tree = utime + stime + cutime + cstime of every live process in it: a child
that exited and was reaped has its time in its parent's cutime/cstime, so the sum
over the live tree counts every process that ever ran in it, once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

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


def _children_map() -> dict[int, list[int]]:
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
    kids = children if children is not None else _children_map()
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(kids.get(current, []))
    return found


def cpu_seconds(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree."""
    kids = _children_map()
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


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process tree (shared pages are counted once per process)."""
    return sum(status_kib(p, "VmRSS") or 0 for p in tree(pid))


@dataclasses.dataclass
class _Peaks:
    overall: dict[str, int] = dataclasses.field(default_factory=dict)
    window: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: int = 0


class RssSampler:
    """Samples VmRSS of some processes every ``interval`` seconds on its own thread.

    ``window()`` returns the peaks since the previous call (one phase of the run);
    ``overall()`` the peaks since the start.
    """

    def __init__(self, pids: Mapping[str, int], *, interval: float = 0.05, trees: Iterable[str] = ()) -> None:
        self.pids = dict(pids)
        self.trees = set(trees)
        self.interval = interval
        self._peaks = _Peaks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        values: dict[str, int] = {}
        for name, pid in self.pids.items():
            value = tree_rss_kib(pid) if name in self.trees else status_kib(pid, "VmRSS")
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

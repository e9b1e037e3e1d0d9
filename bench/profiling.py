"""Sampling the worker with py-spy during one extra batch, and where its time goes.

py-spy comes with the development dependencies (`make install`).
It samples only threads that are running (not waiting), so an idle event loop costs
nothing. The codec is every sample inside imgsvc/compress.py or pyvips; the rest is
grouped by what the service was doing (the innermost imgsvc function on the stack,
or the event-loop callback), by the package of the innermost frame (self time), and
by every package on the stack (inclusive).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def find_py_spy() -> str | None:
    """The py-spy executable beside this Python, or on PATH."""
    return shutil.which(
        "py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )


class Recorder:
    """`py-spy record` attached to a running process; ``stop()`` makes it write its file."""

    def __init__(self, executable: str, pid: int, output: Path, *, rate: int = 100) -> None:
        self.output = output
        self.log = output.with_suffix(".log")
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                [
                    executable,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--threads",
                    "--output",
                    str(output),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()
        self.seconds = 0.0  # from the start to stop(): py-spy samples from its attach, a few ms in

    def stop(self) -> bool:
        """Stop sampling (SIGINT, as Ctrl-C); return whether the file was written."""
        if self.popen.poll() is None:
            self.seconds = time.monotonic() - self.started
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.output.is_file() and self.output.stat().st_size > 0

    def message(self) -> str:
        """What py-spy printed."""
        try:
            return self.log.read_text(errors="replace").strip()
        except OSError:
            return ""


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a sampled stack."""

    function: str
    file: str

    @property
    def package(self) -> str:
        """Top-level package or stdlib module of the frame's file."""
        head = self.file.split("/", 1)[0].removesuffix(".py")
        if head in ("site-packages", "lib", "python3.11"):
            return self.file
        return head or "?"


def _parse_frame(text: str) -> Frame:
    # "function (path/file.py:123)"
    if text.endswith(")") and " (" in text:
        function, _, where = text[:-1].rpartition(" (")
        return Frame(function, where.rsplit(":", 1)[0])
    return Frame(text, "")


@dataclasses.dataclass
class Stack:
    """One distinct stack of one thread, and how many samples it got."""

    thread: str
    frames: list[Frame]
    count: int

    @property
    def in_codec(self) -> bool:
        """Inside the service's compress() or any pyvips call."""
        return any(f.file.endswith("imgsvc/compress.py") or f.file.startswith("pyvips/") for f in self.frames)


def parse_raw(text: str) -> list[Stack]:
    """py-spy's raw (collapsed) output with --threads: 'thread (TID): NAME;frame;... COUNT'."""
    stacks: list[Stack] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or " " not in line:
            continue
        body, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = body.split(";")
        thread = parts[0].split(": ", 1)[-1]
        stacks.append(Stack(thread, [_parse_frame(p) for p in parts[1:]], int(count)))
    return stacks


# Leaf frames where a thread waits rather than works. py-spy's own idle detection does
# not always see these as idle (a thread pool's queue, the event loop's epoll).
_WAITING = (
    ("selectors.py", "select"),
    # uvloop runs its loop in C: a sample whose innermost Python frame is the runner is
    # in uv_run, mostly waiting in epoll (its own, fast, C work is counted with it).
    ("asyncio/runners.py", "Runner.run"),
    ("concurrent/futures/thread.py", "_worker"),
    ("threading.py", "wait"),
    ("queue.py", "get"),
)


def is_waiting(stack: Stack) -> bool:
    """The thread was waiting (empty event loop, idle pool thread), not working."""
    if not stack.frames:
        return True
    leaf = stack.frames[-1]
    return any(leaf.file.endswith(file) and leaf.function.endswith(function) for file, function in _WAITING)


def _thread_kind(name: str) -> str:
    if name == "MainThread":
        return "event loop (MainThread)"
    if name.startswith("imgsvc-image"):
        return "image threads"
    if name.startswith("asyncio"):
        return "asyncio.to_thread / resolver threads"
    return f"other threads ({name.split('_')[0]})"


_ENTRY = ("imgsvc/cli.py", "imgsvc/__main__.py")


def _activity(stack: Stack) -> str:
    """What the service was doing: the innermost imgsvc function on the stack (the command
    line's entry frames aside); else the callback the event loop was running."""
    for frame in reversed(stack.frames):
        if frame.file.startswith("imgsvc/") and frame.file not in _ENTRY:
            module = frame.file.removeprefix("imgsvc/").removesuffix(".py")
            return f"imgsvc.{module}.{frame.function}"
    frames = stack.frames
    # The callback the loop was running: after asyncio's Handle._run, or, under uvloop
    # (whose loop is C), right after the runner.
    starts = [
        i
        for i, f in enumerate(frames)
        if (f.function, f.file)
        in (("Handle._run", "asyncio/events.py"), ("Runner.run", "asyncio/runners.py"))
    ]
    if starts:
        # For socket reads, the protocol that got the data.
        for inner in frames[starts[-1] + 1 :]:
            if inner.package not in ("asyncio", "selectors", "socket", "uvloop"):
                return f"{inner.package}: {inner.function}"
        return "asyncio transports (socket reads and writes)"
    for frame in frames:
        if frame.package not in ("threading", "asyncio", "runpy", "<frozen runpy>", "imgsvc"):
            return f"{frame.package}: {frame.function}"
    return "asyncio event loop itself"


def stage(stack: Stack) -> str:
    """The pipeline stage a sample belongs to, from the frames on its stack."""
    files = [f.file for f in stack.frames]
    functions = [f.function for f in stack.frames]
    if stack.in_codec:
        return "codec: compress() and pyvips"
    if (
        "S3Storage.put" in functions
        or "ClientRequest.write_bytes" in functions
        or any(f.startswith(("aiobotocore/", "botocore/")) for f in files)
    ):
        return "S3 upload: aiobotocore (signing, endpoint rules) and sending the body"
    if any(f.startswith("imgsvc/fetch") for f in files):
        return "download: aiohttp GET and reading the body"
    if any(f.startswith(("imgsvc/db", "asyncpg/")) for f in files) or "record" in functions:
        return "imgsvc SQL: claim, finish and record an image (asyncpg)"
    if any(f.startswith(("procrastinate/", "psycopg/", "psycopg_pool/")) for f in files):
        return "job queue: procrastinate fetching and finishing jobs (psycopg)"
    if any(f.startswith("aiohttp/") for f in files):
        return "aiohttp responses (download or S3)"
    if stack.thread.startswith("imgsvc-image"):
        return "image threads, outside compress()"
    return "event loop and other"


def summarize(stacks: list[Stack], *, rate: int, seconds: float, top: int = 12) -> dict[str, Any]:
    """Shares of the worker's busy samples: codec vs the rest, and the rest broken down.

    ``rate`` and ``seconds`` (how long it sampled) give each thread's utilisation: a
    thread busy all the time gets ``rate * seconds`` samples.
    """
    waiting = sum(s.count for s in stacks if is_waiting(s))
    busy = [s for s in stacks if not is_waiting(s)]
    total = sum(s.count for s in busy)
    if total == 0:
        return {"samples": 0, "waiting_samples": waiting}
    codec = sum(s.count for s in busy if s.in_codec)
    outside = [s for s in busy if not s.in_codec]
    by_thread: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_activity: collections.Counter[str] = collections.Counter()
    by_stage: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    for stack in busy:
        by_thread[_thread_kind(stack.thread)] += stack.count
        by_stage[stage(stack)] += stack.count
    for stack in outside:
        leaf = stack.frames[-1]
        by_package[leaf.package] += stack.count
        for package in {f.package for f in stack.frames} - {"threading", "runpy", "<frozen runpy>"}:
            inclusive[package] += stack.count
        by_activity[_activity(stack)] += stack.count
        by_leaf[f"{leaf.function} ({leaf.file})"] += stack.count
    loop_threads = {s.thread for s in stacks if s.thread == "MainThread"}
    possible = rate * seconds

    def shares(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [
            {"name": name, "samples": n, "percent_of_busy": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "waiting_samples": waiting,
        "codec_samples": codec,
        "codec_percent": round(100 * codec / total, 1),
        "outside_codec_percent": round(100 * (total - codec) / total, 1),
        "event_loop_busy_percent": round(100 * by_thread["event loop (MainThread)"] / possible, 1)
        if loop_threads and possible
        else None,
        "by_thread": shares(by_thread),
        "by_stage": shares(by_stage),
        "outside_codec_by_activity": shares(by_activity),
        "outside_codec_by_package_self": shares(by_package),
        "outside_codec_by_package_inclusive": shares(inclusive),
        "outside_codec_by_leaf_function": shares(by_leaf),
    }

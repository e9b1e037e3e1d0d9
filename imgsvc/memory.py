"""Memory: what one process holds of sources and of codec work at once, and how glibc's
malloc is tuned and trimmed for the codec's large, short-lived buffers.

Two budgets, both owned by a process's resources and handed to the stages that wait on
them: ``SourceBudget`` bounds the source bytes from the start of a download to the end of
its compression (the event loop waits on it); ``MemoryBudget`` bounds the codec's
estimated peak memory (the image threads wait on it). The trimmer is process-wide, as
glibc's heap is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from imgsvc import metrics

# A source of more pixels than this is a large photo: at most
# ``MemoryBudget.large_limit`` of them are compressed at once.
LARGE_PIXELS = 4_000_000


class MemoryBudget:
    """At most ``limit`` bytes of estimated codec memory in work at once in this process:
    an image waits for room rather than being decoded beside others, which bounds the
    worker's memory; small images share the budget. An image larger than the whole
    budget runs alone. Apart from bytes, at most ``large_limit`` large photos at once
    (0: no such rule), so that a thread more than there are cores, which fills the
    codec's single-threaded moments with small images, never holds a large one; and
    ``solo`` images one at a time, beside others that are not."""

    def __init__(self, limit: int = 0, large_limit: int = 0) -> None:
        self.limit = limit
        self.large_limit = large_limit
        self._used = 0
        self._large = 0
        self._solo = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, size: int, *, large: bool = False, solo: bool = False) -> Iterator[None]:
        """Wait (blocking this thread) until ``size`` bytes, a large photo if it is one and
        a solo image if it is one, fit; hold them meanwhile."""
        share = min(size, self.limit) if self.limit else 0
        counted = large and self.large_limit > 0

        def fits() -> bool:
            if (counted and self._large >= self.large_limit) or (solo and self._solo):
                return False
            return self._used == 0 or self._used + share <= self.limit

        with self._room:
            self._room.wait_for(fits)
            self._used += share
            self._large += counted
            self._solo += solo
        try:
            yield
        finally:
            with self._room:
                self._used -= share
                self._large -= counted
                self._solo -= solo
                self._room.notify_all()


# Peak memory of one image in compress(), per source pixel, as measured on the corpus
# photos: the bundled JPEG encoder (mozjpeg) keeps two copies of every DCT coefficient
# to optimise the Huffman tables (6 bytes a pixel at 4:2:0), plus libvips' buffers;
# with the standard tables it streams. A progressive source keeps all its coefficients
# while it is decoded; a rotated image is decoded whole; other formats are whole
# images on the way in and out.
_JPEG_BYTES_PER_PIXEL = 7.0
_JPEG_STREAMED_BYTES_PER_PIXEL = 1.0
_PROGRESSIVE_EXTRA = 3.0
_ROTATED_EXTRA = 3.5
_WEBP_BYTES_PER_PIXEL = 21.0
_OTHER_BYTES_PER_PIXEL = 20.0
_PER_IMAGE = 8 * 1024 * 1024


def memory_estimate(
    fmt: str, pixels: int, *, progressive: bool = False, rotated: bool = False, optimize: bool = True
) -> int:
    """Bytes ``compress()`` is expected to need at its peak for one image; ``optimize``
    says whether a JPEG output gets its own Huffman tables."""
    if fmt == "jpeg":
        per_pixel = _JPEG_BYTES_PER_PIXEL if optimize else _JPEG_STREAMED_BYTES_PER_PIXEL
        per_pixel += _PROGRESSIVE_EXTRA if progressive else 0.0
        per_pixel += _ROTATED_EXTRA if rotated else 0.0
    elif fmt == "webp":
        per_pixel = _WEBP_BYTES_PER_PIXEL
    else:
        per_pixel = _OTHER_BYTES_PER_PIXEL
    return _PER_IMAGE + int(pixels * per_pixel)


class SourceBudget:
    """Bounds the bytes of source images a process holds, from the start of their
    download to the end of their compression.

    A download starts only when what is held, plus what it is expected to bring (the
    running mean of the sources so far), fits in ``limit``, or while fewer than
    ``min_sources`` are held, so the codec threads always have one waiting and a source
    larger than the budget still gets through. Large sources therefore queue a few at a
    time and small ones many at a time: memory for the one, latency hiding for the other.

    Once a source declares its size (Content-Length, before its body is read), its
    download goes on only when that fits beside the other sources of known size, or
    while fewer than ``min_sources`` have a known size. So a burst of large sources after
    many small ones waits at its headers instead of all arriving at once; only bodies of
    undeclared length (chunked) can still pass the limit, each by at most the byte limit
    of one image. Sources of known size never wait again, and they end by themselves, so
    those that wait are always woken.
    """

    def __init__(self, limit: int, min_sources: int, first_guess: int = 0) -> None:
        self.limit = limit
        self.min_sources = max(1, min_sources)
        self.held = 0
        self.sources = 0
        self.known = 0  # sources whose size is declared or read
        self.peak = 0
        # Until a source has been seen, assume a quarter of the budget each, so that a
        # first burst of large sources does not all start at once.
        self.typical = first_guess or max(1, limit // 4)
        self._changed = asyncio.Event()

    async def _wait_until(self, fits: Callable[[], bool]) -> None:
        while not fits():
            self._changed.clear()
            await self._changed.wait()

    def _fits_another(self) -> bool:
        return not self.limit or self.sources < self.min_sources or self.held + self.typical <= self.limit

    def _fits_declared(self, hold: SourceHold, size: int) -> bool:
        return not self.limit or self.known < self.min_sources or self.held - hold.share + size <= self.limit

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[SourceHold]:
        """Wait for room, then hold the expected size; the hold yielded is told the
        declared size (``expect``, which may wait) and the real one (calling it) once
        the source is in memory."""
        await self._wait_until(self._fits_another)
        hold = SourceHold(self)
        self._resize(hold, self.typical)
        self.sources += 1
        try:
            yield hold
        finally:
            self._resize(hold, 0)
            self.sources -= 1
            if hold.known:
                self.known -= 1
            self._changed.set()

    async def expect(self, hold: SourceHold, size: int) -> None:
        """The size ``hold``'s source declares, before its body is read: wait until it
        fits beside the sources of known size, unless fewer than ``min_sources`` have one."""
        await self._wait_until(lambda: self._fits_declared(hold, size))
        self._settle(hold, size)

    def arrived(self, hold: SourceHold, size: int) -> None:
        """``hold``'s source is in memory, ``size`` bytes: the running mean learns it."""
        self.typical += (size - self.typical) // 4
        self._settle(hold, size)

    def _settle(self, hold: SourceHold, size: int) -> None:
        self._resize(hold, size)
        if not hold.known:
            hold.known = True
            self.known += 1
        self._changed.set()

    def _resize(self, hold: SourceHold, size: int) -> None:
        self.held += size - hold.share
        hold.share = size
        self.peak = max(self.peak, self.held)
        metrics.source_bytes.set(self.held)


class SourceHold:
    """One source's place in a SourceBudget: the bytes it holds, and whether they are its
    declared or real size rather than a guess."""

    def __init__(self, budget: SourceBudget) -> None:
        self.budget = budget
        self.share = 0
        self.known = False

    async def expect(self, size: int) -> None:
        """The size the source declares; may wait (``SourceBudget.expect``)."""
        await self.budget.expect(self, size)

    def __call__(self, size: int) -> None:
        """The source's real size, once it is in memory."""
        self.budget.arrived(self, size)


# glibc's mallopt parameters, and the environment variables that set them at start-up
# (which, when given, win over ours).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MALLOC_TUNING = (
    (_M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"),
    (_M_MMAP_THRESHOLD, 2 * 1024 * 1024, "MALLOC_MMAP_THRESHOLD_"),
    (_M_TRIM_THRESHOLD, 32 * 1024 * 1024, "MALLOC_TRIM_THRESHOLD_"),
)


# Once an image estimated at this much has ended, the freed memory is given back to the
# system (malloc_trim), instead of staying in glibc's arenas for the next image to
# fragment. A trim also hands back the free pages that the other threads reuse next
# (the event loop's download and upload buffers above all), which are then faulted in
# again: run after every 12 MP image, that was a fifth of the event loop's CPU. So it
# runs when no image is left in compress(), and while images follow each other at
# most once every interval. (When downloads, not the codec, are the bottleneck, the
# codec runs dry between images and each large one is trimmed after: the cores have
# room for the faults then.)
_TRIM_AFTER = 48 * 1024 * 1024
_TRIM_INTERVAL = 10.0


def _glibc() -> Any:
    """glibc, for mallopt and malloc_trim; None where there is none (another libc)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    return None


_libc = _glibc()


def _trim() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


class _Trimmer:
    """Counts the images in compress(). Once a large image has ended, a trim is owed:
    it is made when no image is left, or when the last trim is ``_TRIM_INTERVAL``
    seconds old, whichever image, large or small, ends then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._working = 0
        self._owed = False
        self._last = -math.inf

    def enter(self) -> None:
        with self._lock:
            self._working += 1

    def leave(self, memory: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._working -= 1
            self._owed = self._owed or memory >= _TRIM_AFTER
            due = self._owed and (self._working == 0 or now - self._last >= _TRIM_INTERVAL)
            if due:
                self._owed = False
                self._last = now
        if due:
            _trim()


trimmer = _Trimmer()  # process-wide, as the heap it trims is


def tune_malloc() -> None:
    """Tune glibc's malloc for the codec's large, short-lived buffers (process-wide;
    a MALLOC_* variable set in the environment wins over ours)."""
    # glibc gives each thread that mallocs under contention an arena of its own, and
    # serves even large blocks from them once a block of that size has been freed
    # (its mmap threshold rises up to 32 MiB). The codec's large, short-lived buffers
    # then leave the arenas fragmented and the process keeps the memory. The known
    # remedies: cap the arenas, and fix the threshold so that blocks over 2 MiB are
    # mapped and unmapped on their own. Fixing it also fixes the trim threshold, at
    # 128 KiB: a free that left more than that at the top of an arena gave it back to
    # the system, and the next download or buffer faulted the pages in again (about 2
    # ms of CPU a 3.6 MB download). At 32 MiB an arena keeps them; malloc_trim after
    # large images still releases the main arena's top and the free pages inside every
    # arena, but not a thread arena's top (docs/performance.md has what each bought).
    if _libc is not None:
        for parameter, value, variable in _MALLOC_TUNING:
            if variable not in os.environ:
                _libc.mallopt(parameter, value)

"""Compress one image with libvips: bytes in, ``models.Compressed`` out.

CPU-bound and blocking: callers run it in a worker thread (libvips releases the
GIL), so the event loop never waits on image work. The format is found from the
bytes, limits are checked from the header before any pixel is decoded, and the
output keeps the source's format (TIFF and HEIC become JPEG, or PNG when they have
transparency), is upright, in sRGB, and carries no metadata.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import pyvips
from PIL import Image as PillowImage

from imgsvc import errors, models, quality

logger = logging.getLogger("imgsvc.compress")

# Loader -> our format name. A loader not listed here is refused.
_FORMATS = {
    "jpegload_buffer": "jpeg",
    "uhdrload_buffer": "jpeg",
    "pngload_buffer": "png",
    "webpload_buffer": "webp",
    "gifload_buffer": "gif",
    "heifload_buffer": "heif",
    "tiffload_buffer": "tiff",
    "svgload_buffer": "svg",
}
_ANIMATED = {"gif", "webp"}
# libvips (as bundled) has no BMP or ICO loader; Pillow reads those two, and nothing
# else, into pixels that libvips then takes over.
_PILLOW_FORMATS = {"BMP": "bmp", "DIB": "bmp", "ICO": "ico"}
SUPPORTED = "JPEG, PNG, WebP, GIF, AVIF, HEIC, TIFF, BMP, ICO"


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one source image may be."""

    max_pixels: int = 50_000_000
    max_frames: int = 300
    quality_factor: float = 0.5
    allow_svg: bool = False
    # JPEG outputs up to this many pixels get Huffman tables computed for the image
    # (optimize_coding); larger ones use the standard tables, which the encoder can
    # stream instead of holding every coefficient twice.
    optimize_max_pixels: int = 16_000_000
    # A progressive JPEG of more pixels than this is compressed beside no other such
    # image (0: no such rule). Its decoder holds every DCT coefficient of the image from
    # the first row to the last, 3 bytes a pixel at 4:2:0: two 24 MP ones at once are what
    # takes a worker past 300 MB.
    progressive_solo_pixels: int = 16_000_000

    def optimizes(self, pixels: int) -> bool:
        """Whether a JPEG output of ``pixels`` gets its own Huffman tables."""
        return pixels <= self.optimize_max_pixels

    def solo(self, pixels: int, *, progressive: bool) -> bool:
        """Whether a source of ``pixels`` must be compressed beside no other such source."""
        return progressive and 0 < self.progressive_solo_pixels < pixels


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


budget = MemoryBudget()

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


_trimmer = _Trimmer()


def configure(*, allow_svg: bool = False, memory: int = 0, large_concurrency: int = 0) -> None:
    """Process-wide settings: no libvips operation cache, untrusted loaders blocked (SVG's
    too, unless allowed), the memory budget (bytes, 0 for none) and how many large photos
    at once (0 for no rule), and malloc tuned for large, short-lived buffers."""
    pyvips.cache_set_max(0)
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoadSvg", not allow_svg)
    budget.limit = memory
    budget.large_limit = large_concurrency
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


def _first_line(exc: pyvips.Error) -> str | None:
    """The first line libvips logged for ``exc``, or None if the log was empty."""
    lines = [line.strip() for line in str(exc.detail or "").splitlines() if line.strip()]
    return lines[0][:200] if lines else None


class _ErrorGate:
    """libvips logs errors in one buffer for the whole process, and pyvips empties it
    whenever it raises: with images converted side by side, an exception can carry
    another image's message, or none. So a failed conversion is run again alone: it
    waits for the conversions under way to finish and holds new ones back, which makes
    the log its own."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self._waiting_alone = 0
        self._alone = False

    @contextlib.contextmanager
    def side_by_side(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._waiting_alone += 1
            self._changed.wait_for(lambda: not self._alone and not self._running)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()


_errors = _ErrorGate()


def _header(data: bytes, **options: Any) -> pyvips.Image:
    try:
        return pyvips.Image.new_from_buffer(data, "", **options)
    except pyvips.Error:
        if b"<svg" in data[:4096].lower():
            raise errors.NotAnImage("SVG images are not accepted (IMGSVC_ALLOW_SVG)") from None
        raise errors.NotAnImage(f"the source is not an image in a supported format ({SUPPORTED})") from None


def _open_with_pillow(data: bytes, limits: Limits) -> tuple[pyvips.Image, str] | None:
    """A BMP or ICO image as libvips pixels, the limit checked before decoding; None for
    anything else."""
    if not data.startswith((b"BM", b"\x00\x00\x01\x00")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PillowImage.DecompressionBombWarning)
            source = PillowImage.open(io.BytesIO(data), formats=("BMP", "DIB", "ICO"))
    except (PillowImage.DecompressionBombError, PillowImage.DecompressionBombWarning) as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(declared.group(1)):,} pixels" if declared else "more pixels than Pillow allows"
        raise errors.SourceTooLarge(
            f"the image declares {size}; the limit is {limits.max_pixels:,} (IMGSVC_MAX_PIXELS)"
        ) from None
    except (OSError, ValueError, SyntaxError):
        return None
    with source:
        width, height = source.size
        if width * height > limits.max_pixels:
            raise errors.SourceTooLarge(
                f"the image is {width}x{height} = {width * height:,} pixels; "
                f"the limit is {limits.max_pixels:,} (IMGSVC_MAX_PIXELS)"
            )
        try:
            pixels = source.convert(
                "RGBA" if "A" in source.getbands() or "transparency" in source.info else "RGB"
            )
        except (OSError, ValueError, SyntaxError) as exc:
            raise errors.NotAnImage(f"the image could not be decoded: {str(exc)[:200]}") from None
        fmt = _PILLOW_FORMATS.get(str(source.format), "bmp")
    image = pyvips.Image.new_from_memory(pixels.tobytes(), width, height, len(pixels.getbands()), "uchar")
    return image.copy(interpretation="srgb"), fmt


class _Opened(NamedTuple):
    image: pyvips.Image
    fmt: str
    memory: int  # the peak bytes its compression is expected to take
    solo: bool  # to be compressed beside no other such image (Limits.solo)


def _open(data: bytes, limits: Limits) -> _Opened:
    """Read the header only, identify the format and apply the limits; with the image,
    its format and what its compression is expected to need."""
    if not data:
        raise errors.NotAnImage("the source is empty (0 bytes)")
    pillow = _open_with_pillow(data, limits)
    if pillow is not None:
        pixels, kind = pillow
        return _Opened(pixels, kind, memory_estimate(kind, pixels.width * pixels.height), solo=False)
    header = _header(data)
    loader = str(header.get("vips-loader"))
    fmt = _FORMATS.get(loader)
    if fmt == "heif" and header.get_typeof("heif-compression") and header.get("heif-compression") == "av1":
        fmt = "avif"
    if fmt is None:
        raise errors.NotAnImage(
            f"the source format ({loader.removesuffix('load_buffer')}) is not supported ({SUPPORTED})"
        )
    if fmt == "svg" and not limits.allow_svg:
        raise errors.NotAnImage("SVG images are not accepted")
    options: dict[str, Any] = {"fail_on": "error"}
    if fmt in _ANIMATED:
        # The frame count from the n=-1 header: the "n-pages" field is not always set.
        header = _header(data, n=-1)
        options["n"] = -1
    frame_height = header.get_page_height()
    pages = max(1, header.height // frame_height)
    pixels = header.width * frame_height
    if pixels > limits.max_pixels:
        raise errors.SourceTooLarge(
            f"the image is {header.width}x{frame_height} = {pixels:,} pixels; "
            f"the limit is {limits.max_pixels:,} (IMGSVC_MAX_PIXELS)"
        )
    if pages > limits.max_frames:
        raise errors.SourceTooLarge(
            f"the image has {pages:,} frames; the limit is {limits.max_frames:,} (IMGSVC_MAX_FRAMES)"
        )
    # Rotating needs random access; everything else streams top to bottom.
    orientation = header.get("orientation") if header.get_typeof("orientation") else 1
    if orientation in (0, 1):
        options["access"] = "sequential"
    progressive = bool(header.get_typeof("jpeg-multiscan") and header.get("jpeg-multiscan"))
    memory = memory_estimate(
        fmt,
        pixels * pages,
        progressive=progressive,
        rotated=orientation not in (0, 1),
        optimize=limits.optimizes(pixels),
    )
    return _Opened(
        _header(data, **options), fmt, memory, solo=limits.solo(pixels * pages, progressive=progressive)
    )


def _to_srgb(image: pyvips.Image) -> pyvips.Image:
    """Pixels in 8-bit sRGB (or grey), with any embedded profile applied."""
    if image.get_typeof("icc-profile-data"):
        image = image.icc_transform("srgb", embedded=True, intent="perceptual")
    elif image.interpretation == "cmyk":
        image = image.icc_transform("srgb", input_profile="cmyk", intent="perceptual")
    target = "b-w" if image.interpretation in ("b-w", "grey16") else "srgb"
    if image.interpretation != target or image.format != "uchar":
        image = image.colourspace(target)
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def _encode(image: pyvips.Image, fmt: str, q: int | None, limits: Limits) -> bytes:
    common: dict[str, Any] = {"keep": pyvips.enums.ForeignKeep.NONE}
    if fmt == "jpeg":
        if image.hasalpha():
            image = image.flatten(background=[255])
        return bytes(
            image.jpegsave_buffer(Q=q, optimize_coding=limits.optimizes(image.width * image.height), **common)
        )
    if fmt == "png":
        return bytes(image.pngsave_buffer(palette=True, Q=q, effort=4, **common))
    if fmt == "webp":
        return bytes(image.webpsave_buffer(Q=q, effort=4, **common))
    if fmt == "gif":
        # GIF has no quality knob: half the palette (128 colours), and let frames
        # reuse pixels and palettes within a small error.
        return bytes(
            image.gifsave_buffer(
                bitdepth=quality.GIF_BITDEPTH,
                interframe_maxerror=8,
                interpalette_maxerror=8,
                reuse=True,
                **common,
            )
        )
    if fmt == "avif":
        return bytes(image.heifsave_buffer(Q=q, compression="av1", effort=4, **common))
    raise errors.ImgsvcError(f"no encoder for {fmt}")


def _plan(fmt: str, data: bytes, image: pyvips.Image, factor: float) -> tuple[str, int | None, int | None]:
    """The output format, the estimated source quality and the output quality."""
    if fmt == "jpeg":
        q_in = quality.estimate_jpeg_quality(data) or quality.LOSSLESS_QUALITY
        return "jpeg", q_in, quality.target_quality(q_in, factor)
    if fmt in ("webp", "avif"):
        q_in = quality.NOMINAL_QUALITY[fmt]
        return fmt, q_in, quality.target_quality(q_in, factor)
    if fmt == "png":
        return "png", quality.LOSSLESS_QUALITY, quality.PNG_PALETTE_QUALITY
    if fmt == "gif":
        return "gif", None, None
    # TIFF, HEIC, BMP, ICO and SVG: JPEG, or PNG where there is transparency to keep.
    q_in = quality.NOMINAL_QUALITY.get(fmt, quality.LOSSLESS_QUALITY)
    if image.hasalpha():
        return "png", q_in, quality.PNG_PALETTE_QUALITY
    return "jpeg", q_in, quality.target_quality(quality.LOSSLESS_QUALITY, factor)


def compress(data: bytes, limits: Limits) -> models.Compressed:
    """Re-encode ``data`` at the quality rule's quality; raise PermanentError if it can't be."""
    memory = 0
    _trimmer.enter()
    try:
        with _errors.side_by_side():
            image, fmt_in, memory, solo = _open(data, limits)
        try:
            with budget.hold(memory, large=image.width * image.get_page_height() > LARGE_PIXELS, solo=solo):
                return _compress(data, image, fmt_in, limits)
        finally:
            del image
    finally:
        _trimmer.leave(memory)


def _convert(data: bytes, image: pyvips.Image, fmt_in: str, limits: Limits) -> models.Compressed:
    fmt_out, q_in, q_out = _plan(fmt_in, data, image, limits.quality_factor)
    if image.get_n_pages() == 1 or fmt_in not in _ANIMATED:
        image = image.autorot()
    image = _to_srgb(image)
    return models.Compressed(
        data=_encode(image, fmt_out, q_out, limits),
        format_in=fmt_in,
        format_out=fmt_out,
        width=image.width,
        height=image.get_page_height() if image.get_n_pages() > 1 else image.height,
        quality_in=q_in,
        quality_out=q_out,
        kept_original=False,
    )


def _compress(data: bytes, image: pyvips.Image, fmt_in: str, limits: Limits) -> models.Compressed:
    try:
        with _errors.side_by_side():
            converted = _convert(data, image, fmt_in, limits)
    except pyvips.Error:
        # Run again alone for a reason that is this image's own. The alone run waits
        # while holding this image's share of the budget; what it waits for already
        # holds theirs, so the two never wait on each other.
        with _errors.alone():
            pyvips.vips_lib.vips_error_clear()  # lines no exception took
            try:
                converted = _convert(data, _open(data, limits).image, fmt_in, limits)
            except pyvips.Error as alone:
                reason = _first_line(alone) or str(alone.message)
                raise errors.NotAnImage(f"the image could not be decoded: {reason}") from alone
    if len(converted.data) >= len(data) and converted.format_out == fmt_in:
        return dataclasses.replace(converted, data=data, quality_out=converted.quality_in, kept_original=True)
    return converted

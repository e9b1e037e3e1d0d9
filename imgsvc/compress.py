"""Compress one image with libvips: bytes in, ``models.Compressed`` out.

CPU-bound and blocking: callers run it in a worker thread (libvips releases the
GIL), so the event loop never waits on image work. The format is found from the
bytes, limits are checked from the header before any pixel is decoded, and the
output keeps the source's format (TIFF and HEIC become JPEG, or PNG when they have
transparency), is upright, in sRGB, and carries no metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import pyvips
from PIL import Image as PillowImage

from imgsvc import errors, icc, memory, models, quality

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
    # The lowest quality an output is encoded at, unless its source's is lower.
    min_quality: int = 30
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


#: Raised whenever this module would make other bytes from the same source and settings:
#: outputs stored under an older value are made again. 2: sources tagged with an sRGB
#: profile are no longer transformed to sRGB.
RULES = 2


@functools.cache
def settings_key(limits: Limits) -> str:
    """What shapes an output's bytes, readable: the outputs table's key with the source's
    SHA-256. The pixel limits only refuse sources, so they are not part of it."""
    vips = ".".join(str(pyvips.version(part)) for part in range(3))
    return (
        f"rules={RULES};quality_factor={limits.quality_factor:g};min_quality={limits.min_quality};"
        f"optimize_max_pixels={limits.optimize_max_pixels};libvips={vips}"
    )


def configure(*, allow_svg: bool = False) -> None:
    """Process-wide settings: no libvips operation cache, untrusted loaders blocked (SVG's
    too, unless allowed), and malloc tuned for the codec (``memory.tune_malloc``)."""
    pyvips.cache_set_max(0)
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoadSvg", not allow_svg)
    memory.tune_malloc()


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
    needs: int  # the peak bytes its compression is expected to take
    solo: bool  # to be compressed beside no other such image (Limits.solo)


def _open(data: bytes, limits: Limits) -> _Opened:
    """Read the header only, identify the format and apply the limits; with the image,
    its format and what its compression is expected to need."""
    if not data:
        raise errors.NotAnImage("the source is empty (0 bytes)")
    pillow = _open_with_pillow(data, limits)
    if pillow is not None:
        pixels, kind = pillow
        return _Opened(pixels, kind, memory.memory_estimate(kind, pixels.width * pixels.height), solo=False)
    # Opened once as most images are compressed (streamed top to bottom); opened again
    # only for what that cannot give: animation, rotation, or a header that fails so.
    streamed: dict[str, Any] = {"fail_on": "error", "access": "sequential"}
    try:
        header = pyvips.Image.new_from_buffer(data, "", **streamed)
    except pyvips.Error:
        header, streamed = _header(data), {}
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
        header, streamed = _header(data, n=-1), {}
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
    needs = memory.memory_estimate(
        fmt,
        pixels * pages,
        progressive=progressive,
        rotated=orientation not in (0, 1),
        optimize=limits.optimizes(pixels),
    )
    image = header if options == streamed else _header(data, **options)
    return _Opened(image, fmt, needs, solo=limits.solo(pixels * pages, progressive=progressive))


def _needs_transform(image: pyvips.Image) -> bool:
    """Whether ``image``'s embedded profile must be applied: not when it is 8-bit RGB
    tagged with a profile that is sRGB already (``icc.is_srgb``)."""
    if image.format != "uchar" or image.interpretation != "srgb" or image.bands not in (3, 4):
        return True
    return not icc.is_srgb(image.get("icc-profile-data"))


def _to_srgb(image: pyvips.Image) -> pyvips.Image:
    """Pixels in 8-bit sRGB (or grey), with any embedded profile applied, unless it is
    sRGB's own."""
    if image.get_typeof("icc-profile-data"):
        if _needs_transform(image):
            image = image.icc_transform("srgb", embedded=True, intent=icc.INTENT)
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


def _plan(
    fmt: str, data: bytes, image: pyvips.Image, factor: float, floor: int
) -> tuple[str, int | None, int | None]:
    """The output format, the estimated source quality and the output quality."""
    if fmt == "jpeg":
        q_in = quality.estimate_jpeg_quality(data) or quality.LOSSLESS_QUALITY
        return "jpeg", q_in, quality.target_quality(q_in, factor, floor)
    if fmt in ("webp", "avif"):
        q_in = quality.NOMINAL_QUALITY[fmt]
        return fmt, q_in, quality.target_quality(q_in, factor, floor)
    if fmt == "png":
        return "png", quality.LOSSLESS_QUALITY, quality.PNG_PALETTE_QUALITY
    if fmt == "gif":
        return "gif", None, None
    # TIFF, HEIC, BMP, ICO and SVG: JPEG, or PNG where there is transparency to keep.
    q_in = quality.NOMINAL_QUALITY.get(fmt, quality.LOSSLESS_QUALITY)
    if image.hasalpha():
        return "png", q_in, quality.PNG_PALETTE_QUALITY
    return "jpeg", q_in, quality.target_quality(quality.LOSSLESS_QUALITY, factor, floor)


def compress(data: bytes, limits: Limits, budget: memory.MemoryBudget | None = None) -> models.Compressed:
    """Re-encode ``data`` at the quality rule's quality; raise PermanentError if it can't be.
    With a ``budget``, wait (blocking this thread) until the image's estimated memory fits."""
    needs = 0
    memory.trimmer.enter()
    try:
        with _errors.side_by_side():
            image, fmt_in, needs, solo = _open(data, limits)
        try:
            if budget is None:
                return _compress(data, image, fmt_in, limits)
            large = image.width * image.get_page_height() > memory.LARGE_PIXELS
            with budget.hold(needs, large=large, solo=solo):
                return _compress(data, image, fmt_in, limits)
        finally:
            del image
    finally:
        memory.trimmer.leave(needs)


def _convert(data: bytes, image: pyvips.Image, fmt_in: str, limits: Limits) -> models.Compressed:
    fmt_out, q_in, q_out = _plan(fmt_in, data, image, limits.quality_factor, limits.min_quality)
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

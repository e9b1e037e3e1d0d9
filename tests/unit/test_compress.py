"""Compression of real files: format kept, upright, sRGB, smaller, limits refused."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pyvips

from imgsvc import compress, errors, memory, models, quality

IMAGES = Path(__file__).parents[1] / "images"
LIMITS = compress.Limits()


def run(name: str, limits: compress.Limits = LIMITS) -> models.Compressed:
    compress.configure()
    return compress.compress((IMAGES / name).read_bytes(), limits)


def test_jpeg_is_reencoded_at_half_its_estimated_quality() -> None:
    source = (IMAGES / "mei_Panasonic_DMC-LC70.jpg").read_bytes()
    result = run("mei_Panasonic_DMC-LC70.jpg")
    assert (result.format_in, result.format_out, result.quality_in, result.quality_out) == (
        "jpeg",
        "jpeg",
        99,
        50,
    )
    assert len(result.data) < len(source) / 3
    assert quality.estimate_jpeg_quality(result.data) == 50
    out = pyvips.Image.new_from_buffer(result.data, "")
    assert (out.width, out.height) == (1280, 960)
    assert out.get_typeof("exif-data") == 0 and out.get_typeof("icc-profile-data") == 0


def test_jpegs_over_the_optimize_limit_get_the_standard_huffman_tables() -> None:
    """The same coefficients either way (Huffman coding is lossless): the same pixels,
    only the optimised file is smaller."""
    name = "bimg_northern_cardinal_bird.jpg"
    pixels = 1920 * 1080
    optimised = run(name, compress.Limits(optimize_max_pixels=pixels))
    standard = run(name, compress.Limits(optimize_max_pixels=pixels - 1))
    assert optimised.quality_out == standard.quality_out
    assert len(optimised.data) < len(standard.data) * 0.97
    a, b = (pyvips.Image.new_from_buffer(r.data, "") for r in (optimised, standard))
    assert (a.width * a.height, b.width * b.height) == (pixels, pixels)
    assert (a - b).abs().max() == 0


def test_exif_orientation_is_applied() -> None:
    before = pyvips.Image.new_from_file(str(IMAGES / "jpeg_exif-orientation-6_landscape.jpg"))
    assert (before.width, before.height, before.get("orientation")) == (450, 600, 6)
    result = run("jpeg_exif-orientation-6_landscape.jpg")
    out = pyvips.Image.new_from_buffer(result.data, "")
    assert (out.width, out.height) == (600, 450)
    assert out.get_typeof("orientation") == 0 or out.get("orientation") == 1


def test_cmyk_becomes_srgb() -> None:
    result = run("jpeg_cmyk_adobe_no-icc.jpg")
    out = pyvips.Image.new_from_buffer(result.data, "")
    assert (out.interpretation, out.bands) == ("srgb", 3)


def test_png_is_palette_quantised_and_keeps_transparency() -> None:
    result = run("png_palette_trns.png")
    out = pyvips.Image.new_from_buffer(result.data, "")
    assert result.format_out == "png" and out.hasalpha()
    assert out.get("palette") == 1 or out.get("bits-per-sample") <= 8


def test_photo_png_gets_much_smaller() -> None:
    source = (IMAGES / "kodak_kodim23.png").stat().st_size
    result = run("kodak_kodim23.png")
    assert result.format_out == "png" and len(result.data) < source / 2


def test_webp_and_gif_keep_their_format() -> None:
    webp = run("webp_lossy_alpha_5_webp_a.webp")
    assert (webp.format_out, webp.quality_in, webp.quality_out) == ("webp", 75, 38)
    gif = run("gif_animated_loop3.gif")
    assert gif.format_out == "gif"
    assert pyvips.Image.new_from_buffer(gif.data, "", n=-1).get_n_pages() == 10


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(errors.SourceTooLarge, match="4,128,062,500 pixels"):
        run("bomb_lottapixel_64250x64250.jpg")
    with pytest.raises(errors.SourceTooLarge, match="IMGSVC_MAX_PIXELS"):
        run("kodak_kodim23.png", compress.Limits(max_pixels=100_000))


def test_frame_limit() -> None:
    with pytest.raises(errors.SourceTooLarge, match="10 frames"):
        run("gif_animated_loop3.gif", compress.Limits(max_frames=5))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"<!doctype html><p>not found</p>", "not an image"),
        ((IMAGES / "truncated_jpeg_BlueSquare.jpg").read_bytes(), "could not be decoded"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>", "SVG"),
    ],
)
def test_bad_bytes_fail_with_a_reason(data: bytes, words: str) -> None:
    compress.configure()
    with pytest.raises(errors.NotAnImage, match=words):
        compress.compress(data, LIMITS)


def _damaged_png() -> bytes:
    data = bytearray((IMAGES / "kodak_kodim23.png").read_bytes())
    start = data.find(b"IDAT") + 5000
    data[start : start + 100] = bytes(100)  # zeroes in the middle of the compressed pixels
    return bytes(data)


def test_failures_side_by_side_each_keep_their_own_reason() -> None:
    """libvips logs errors in one buffer per process: without the error gate, images
    failing at once swapped or lost their reasons about half the time."""
    compress.configure()
    sources = {
        "jpeg": ((IMAGES / "truncated_jpeg_BlueSquare.jpg").read_bytes(), "premature end of JPEG"),
        "png": (_damaged_png(), "libpng read error"),
        "good": ((IMAGES / "png_palette_trns.png").read_bytes(), None),
    }

    def outcome(kind: str) -> tuple[str, str]:
        data, _ = sources[kind]
        try:
            compress.compress(data, LIMITS)
        except errors.NotAnImage as exc:
            return kind, str(exc)
        return kind, "done"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(outcome, ["jpeg", "png", "good"] * 40))
    wrong = [(kind, said) for kind, said in outcomes if (sources[kind][1] or "done") not in said]
    assert not wrong, wrong[:5]


# How long a holder waits for the others it should meet inside; reached at once when the
# rule under test lets them in, so only a broken rule makes a test wait this long.
MEET_SECONDS = 5.0


def _held_at_once(
    hold: Callable[[str], contextlib.AbstractContextManager[None]], kinds: list[str], *, meet: int = 0
) -> tuple[dict[str, int], int]:
    """Each kind through ``hold`` in three threads, holding for a moment: the most of each
    kind, and of all, held at once. With ``meet``, each holder waits (up to MEET_SECONDS)
    until that many have been inside together once, instead of a fixed moment."""
    inside: list[str] = []
    most_of: dict[str, int] = {}
    most = 0
    lock = threading.Lock()
    met = threading.Event()

    def work(kind: str) -> None:
        nonlocal most
        with hold(kind):
            with lock:
                inside.append(kind)
                most_of[kind] = max(most_of.get(kind, 0), inside.count(kind))
                most = max(most, len(inside))
                if len(inside) >= meet:
                    met.set()
            if meet:
                met.wait(MEET_SECONDS)
            else:
                time.sleep(0.05)
            with lock:
                inside.remove(kind)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(work, kinds))
    return most_of, most


def test_the_memory_budget_runs_big_images_one_at_a_time_and_small_ones_together() -> None:
    budget = memory.MemoryBudget(100)

    def hold(size: str) -> contextlib.AbstractContextManager[None]:
        return budget.hold(int(size))

    assert _held_at_once(hold, ["60"] * 3)[1] == 1  # 60 + 60 does not fit: one at a time
    assert _held_at_once(hold, ["30"] * 3, meet=3)[1] == 3  # all three fit at once
    assert _held_at_once(hold, ["500", "20"])[1] == 1  # larger than the whole budget: runs, and alone


def test_at_most_large_limit_large_photos_at_once_while_small_ones_fill_the_threads() -> None:
    budget = memory.MemoryBudget(0, large_limit=2)

    def hold(kind: str) -> contextlib.AbstractContextManager[None]:
        return budget.hold(1, large=kind == "large")

    assert _held_at_once(hold, ["large"] * 6)[0] == {"large": 2}
    # The third thread takes small photos beside two large ones.
    assert _held_at_once(hold, ["large", "large", "small", "small", "small", "small"], meet=3)[1] == 3


def test_solo_images_run_one_at_a_time_while_others_run_beside_them() -> None:
    budget = memory.MemoryBudget(0, large_limit=2)

    def hold(kind: str) -> contextlib.AbstractContextManager[None]:
        return budget.hold(1, large=True, solo=kind == "solo")

    assert _held_at_once(hold, ["solo"] * 4)[0] == {"solo": 1}
    most_of, most = _held_at_once(hold, ["solo", "solo", "other", "other", "solo", "other"], meet=2)
    assert most_of["solo"] == 1
    assert most == 2  # a solo image beside one that is not, within the large limit


def test_progressive_jpegs_over_the_limit_are_solo_and_nothing_else_is() -> None:
    low = compress.Limits(progressive_solo_pixels=1_000_000)
    progressive = (IMAGES / "mei_Panasonic_DMC-LC70.jpg").read_bytes()  # 1.2 MP, progressive
    baseline = (IMAGES / "bimg_northern_cardinal_bird.jpg").read_bytes()  # 2.1 MP, baseline
    assert compress._open(progressive, low).solo
    assert not compress._open(baseline, low).solo
    assert not compress._open(progressive, LIMITS).solo  # the default: over 16 MP
    assert not compress._open(progressive, compress.Limits(progressive_solo_pixels=0)).solo


def test_compress_runs_solo_images_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compress.configure()
    budget = memory.MemoryBudget()  # no byte or large-photo rule: only the solo one
    low = compress.Limits(progressive_solo_pixels=1_000_000)
    progressive = (IMAGES / "mei_Panasonic_DMC-LC70.jpg").read_bytes()
    baseline = (IMAGES / "bimg_northern_cardinal_bird.jpg").read_bytes()
    running: list[bytes] = []
    most_progressive: list[int] = []
    most: list[int] = []
    lock = threading.Lock()
    convert = compress._compress
    met = threading.Event()  # two images have run at once

    def watched(data: bytes, *args: object) -> models.Compressed:
        with lock:
            running.append(data)
            most_progressive.append(running.count(progressive))
            most.append(len(running))
            if len(running) >= 2:
                met.set()
        try:
            met.wait(MEET_SECONDS)
            return convert(data, *args)  # type: ignore[arg-type]
        finally:
            with lock:
                running.remove(data)

    monkeypatch.setattr(compress, "_compress", watched)
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(lambda data: compress.compress(data, low, budget), [progressive, baseline] * 4)
        )
    assert all(r.format_out == "jpeg" for r in results)
    assert max(most_progressive) == 1
    assert max(most) >= 2  # baseline images still ran beside them


def test_a_large_image_owes_a_trim_paid_when_none_is_left_or_the_interval_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[float] = []
    monkeypatch.setattr(memory, "_trim", lambda: trims.append(time.monotonic()))
    large, small = memory._TRIM_AFTER, memory._TRIM_AFTER - 1
    trimmer = memory._Trimmer()
    trimmer.enter()
    trimmer.enter()
    trimmer.leave(large)  # another at work, but no trim ever made: the interval is over
    assert len(trims) == 1
    trimmer.enter()
    trimmer.leave(large)  # another at work, the last trim fresh: owed
    assert len(trims) == 1
    trimmer.leave(small)  # none left: the owed trim, though this image is small
    assert len(trims) == 2
    trimmer.enter()
    trimmer.leave(small)  # none left, nothing owed
    assert len(trims) == 2
    monkeypatch.setattr(memory, "_TRIM_INTERVAL", 0.0)
    trimmer.enter()
    trimmer.enter()
    trimmer.leave(large)  # another at work, the interval over: trims
    assert len(trims) == 3

"""The quality rule: estimating a JPEG's quality from its tables, and halving it."""

from __future__ import annotations

from pathlib import Path

import pytest
import pyvips

from imgsvc import quality

IMAGES = Path(__file__).parents[1] / "images"


@pytest.fixture(scope="module")
def photo() -> pyvips.Image:
    return pyvips.Image.new_from_file(str(IMAGES / "kodak_kodim23.png"))


@pytest.mark.parametrize("q", [5, 10, 20, 35, 50, 62, 75, 85, 90, 95, 98, 100])
def test_estimate_recovers_the_quality_libjpeg_encoded_at(photo: pyvips.Image, q: int) -> None:
    baseline = photo.jpegsave_buffer(Q=q)
    progressive = photo.jpegsave_buffer(Q=q, interlace=True, optimize_coding=True)
    assert quality.estimate_jpeg_quality(baseline) == q
    assert quality.estimate_jpeg_quality(progressive) == q


def test_estimates_of_committed_photos() -> None:
    # Camera and editor files whose tables are not exactly IJG's still land near.
    cardinal = (IMAGES / "bimg_northern_cardinal_bird.jpg").read_bytes()
    panasonic = (IMAGES / "mei_Panasonic_DMC-LC70.jpg").read_bytes()
    assert quality.estimate_jpeg_quality(cardinal) == 100
    assert quality.estimate_jpeg_quality(panasonic) == 99


def test_tables_are_read_from_the_segments() -> None:
    data = (IMAGES / "jpeg_cmyk_adobe_no-icc.jpg").read_bytes()
    tables = quality.jpeg_quantization_tables(data)
    assert set(tables) >= {0, 1} and all(len(t) == 64 for t in tables.values())


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"not a jpeg", b"\xff\xd8\xff\xdb\x00"])
def test_no_estimate_without_tables(data: bytes) -> None:
    assert quality.estimate_jpeg_quality(data) is None


@pytest.mark.parametrize(
    ("source", "factor", "expected"),
    [
        (90, 0.5, 45),
        (75, 0.5, 38),
        (100, 0.5, 50),
        (1, 0.5, 1),
        (80, 0.25, 20),
        (60, 1.0, 60),
    ],
)
def test_target_quality(source: int, factor: float, expected: int) -> None:
    assert quality.target_quality(source, factor) == expected


def test_the_floor_stops_a_second_halving_but_not_a_low_source() -> None:
    # Our output at 45, re-encoded by a CDN at 50: sent again, it lands on the floor.
    assert quality.target_quality(50, 0.5, 30) == 30
    # Any number of such round trips ends there.
    q = 90
    for _ in range(5):
        q = quality.target_quality(q, 0.5, 30)
    assert q == 30
    # A source already below the floor keeps its own quality: never raised above it.
    assert quality.target_quality(20, 0.5, 30) == 20
    assert quality.target_quality(90, 0.5, 30) == 45  # above the floor, half as ever

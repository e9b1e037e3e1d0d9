"""Colour profiles: whether an embedded ICC profile already describes sRGB, decided once
per distinct profile.

Most web JPEGs carry an sRGB profile: the 3 KB "sRGB IEC61966-2.1", or the 524-byte
"c2" that Unsplash and Facebook embed. Transforming their pixels to sRGB changes
nothing a viewer can see and costs a third of the codec's time, so ``compress()``
skips it for those. The decision is colorimetric, never the profile's description:
a grid of colours goes through the transform ``compress()`` would make, and the
profile counts as sRGB when no colour moves by more than ``MAX_DELTA_E`` (CIEDE2000).
Profiles are told apart by the SHA-256 of their bytes, and each verdict is kept.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict

import pyvips

#: The largest colour difference (CIEDE2000) that the transform to sRGB may make on any
#: colour of the grid for a profile to count as sRGB. 1.0 is about the smallest
#: difference an observer sees side by side; rounding to 8 bits alone makes up to 0.5.
MAX_DELTA_E = 1.0
#: Levels per channel of the colour grid (9: 0, 32, ..., 255, and 729 colours).
_LEVELS = 9
#: Verdicts kept; a process meets few distinct profiles, but sources are untrusted.
_CACHE_SIZE = 1024
# The same transform compress() makes, so the verdict is about what skipping it changes.
INTENT = "perceptual"


@functools.cache
def _grid() -> pyvips.Image:
    """Every combination of ``_LEVELS`` levels of R, G and B, one colour a pixel, in sRGB."""
    steps = [min(255, round(i * 256 / (_LEVELS - 1))) for i in range(_LEVELS)]
    pixels = bytes(value for r in steps for g in steps for b in steps for value in (r, g, b))
    image = pyvips.Image.new_from_memory(pixels, len(steps) ** 3, 1, 3, "uchar")
    return image.copy(interpretation="srgb")


def delta_e(profile: bytes) -> float | None:
    """The largest CIEDE2000 difference the transform from ``profile`` to sRGB makes on the
    grid's colours (taken as sRGB both before and after); None when it is no RGB profile
    or libvips cannot use it."""
    if len(profile) < 132 or profile[16:20] != b"RGB ":
        return None
    grid = _grid()
    tagged = grid.copy()
    tagged.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    try:
        # libvips falls back to ``input_profile`` for a profile lcms cannot read: Display
        # P3, far from sRGB, so that a broken profile is never taken for sRGB.
        moved = tagged.icc_transform("srgb", embedded=True, input_profile="p3", intent=INTENT)
        if moved.bands != 3 or moved.format != "uchar":
            return None
        before = grid.icc_import(input_profile="srgb", intent="relative")
        after = moved.copy(interpretation="srgb").icc_import(input_profile="srgb", intent="relative")
        return float(before.dE00(after).max())
    except pyvips.Error:
        return None


class _Verdicts:
    """sRGB or not, by the SHA-256 of a profile's bytes, for the last ``_CACHE_SIZE``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[bytes, bool] = OrderedDict()

    def is_srgb(self, profile: bytes) -> bool:
        key = hashlib.sha256(profile).digest()
        with self._lock:
            verdict = self._kept.get(key)
            if verdict is not None:
                self._kept.move_to_end(key)
                return verdict
        difference = delta_e(profile)
        verdict = difference is not None and difference <= MAX_DELTA_E
        with self._lock:
            self._kept[key] = verdict
            while len(self._kept) > _CACHE_SIZE:
                self._kept.popitem(last=False)
        return verdict

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


verdicts = _Verdicts()  # process-wide: a profile's verdict never changes


def is_srgb(profile: bytes) -> bool:
    """Whether pixels tagged with ``profile`` are sRGB already, within ``MAX_DELTA_E``
    (decided once per distinct profile)."""
    return verdicts.is_srgb(profile)

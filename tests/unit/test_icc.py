"""Colour profiles: sRGB ones recognised by their colours and left alone; wide-gamut and
CMYK ones still applied, and their colours come out right in sRGB."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
import pyvips
from PIL import Image as PillowImage
from PIL import ImageCms

from imgsvc import compress, icc

IMAGES = Path(__file__).parents[1] / "images"


def _embedded(name: str) -> bytes:
    return bytes(pyvips.Image.new_from_file(str(IMAGES / name)).get("icc-profile-data"))


C2 = _embedded("icc_c2_unsplash-urel-landetne_48x64.jpg")
ADOBE_RGB = _embedded("icc_adobe-rgb-1998_canon5d2_64x43.jpg")

# Colours inside sRGB, and so inside every wider space: saturated primaries, skin,
# greys. Flat patches, so that a JPEG at quality 50 keeps their centres.
PATCHES = [
    (220, 30, 30), (30, 180, 40), (40, 60, 210), (240, 200, 40), (200, 150, 120),
    (128, 128, 128), (30, 30, 30), (235, 235, 235), (160, 40, 180), (20, 170, 190),
]  # fmt: skip
PATCH = 32


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def matrix_profile(description: str, primaries: list[tuple[float, float, float]], gamma: float) -> bytes:
    """An ICC v2 RGB display profile of D50-adapted primaries (XYZ of red, green, blue)
    and one gamma for the three curves."""
    text = description.encode("ascii") + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    xyz = [b"XYZ " + bytes(4) + b"".join(_s15(v) for v in p) for p in primaries]
    white = b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    cprt = b"text" + bytes(4) + b"No copyright\0"
    tags = [(b"desc", desc), (b"wtpt", white), (b"rXYZ", xyz[0]), (b"gXYZ", xyz[1]), (b"bXYZ", xyz[2])]
    tags += [(b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", cprt)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
        + bytes(12) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4) + white[8:] + bytes(4 + 16 + 28)
    )  # fmt: skip
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


PROPHOTO = matrix_profile(
    "ProPhoto RGB (test)", [(0.7977, 0.2880, 0.0), (0.1352, 0.7119, 0.0), (0.0313, 0.0001, 0.8249)], 1.8
)


def _libvips_profile(name: str) -> bytes:
    grey = (pyvips.Image.black(2, 2, bands=3) + 100).cast("uchar").copy(interpretation="srgb")
    return bytes(grey.icc_export(output_profile=name).get("icc-profile-data"))


def _patches() -> pyvips.Image:
    """The PATCHES side by side, in sRGB."""
    row = b"".join(bytes(colour) * PATCH for colour in PATCHES)
    pixels = row * PATCH
    image = pyvips.Image.new_from_memory(pixels, PATCH * len(PATCHES), PATCH, 3, "uchar")
    return image.copy(interpretation="srgb")


def _centres(image: pyvips.Image) -> list[tuple[int, ...]]:
    """Each patch's colour: the mean of the 8x8 pixels at its centre, band by band."""
    half = PATCH // 2
    centres = [image.crop(i * PATCH + half - 4, half - 4, 8, 8) for i in range(len(PATCHES))]
    return [tuple(round(centre[band].avg()) for band in range(3)) for centre in centres]


def _tagged_jpeg(pixels: pyvips.Image, profile: bytes | None) -> bytes:
    image = pixels.copy()
    if profile is not None:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    return bytes(image.jpegsave_buffer(Q=95, subsample_mode="off", keep=pyvips.enums.ForeignKeep.ICC))


def _in_space(profile: bytes) -> pyvips.Image:
    """The sRGB patches converted into ``profile``'s space by Pillow's own lcms, not
    libvips: the colours a photo in that space would hold."""
    source = PillowImage.frombytes("RGB", (PATCH * len(PATCHES), PATCH), _patches().write_to_memory())
    converted = ImageCms.profileToProfile(
        source,
        ImageCms.createProfile("sRGB"),
        ImageCms.ImageCmsProfile(io.BytesIO(profile)),
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        outputMode="RGB",
    )
    assert converted is not None
    image = pyvips.Image.new_from_memory(converted.tobytes(), converted.width, converted.height, 3, "uchar")
    return image.copy(interpretation="srgb")


def _furthest(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> int:
    return max(abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


@pytest.mark.parametrize(
    ("name", "profile", "srgb"),
    [
        ("libvips sRGB", _libvips_profile("srgb"), True),
        ("c2 (Unsplash, Facebook)", C2, True),
        ("Adobe RGB (1998)", ADOBE_RGB, False),
        ("Display P3", _libvips_profile("p3"), False),
        ("ProPhoto RGB", PROPHOTO, False),
        ("CMYK", _libvips_profile("cmyk"), False),
        ("not a profile", b"\0" * 16 + b"RGB " + b"\0" * 200, False),
    ],
)
def test_a_profile_is_srgb_by_its_colours(name: str, profile: bytes, srgb: bool) -> None:
    icc.verdicts.clear()
    assert icc.is_srgb(profile) is srgb, name
    difference = icc.delta_e(profile)
    if srgb:
        assert difference is not None and difference <= icc.MAX_DELTA_E
    elif difference is not None:
        assert difference > 3 * icc.MAX_DELTA_E  # far from the threshold, not near it


def test_the_verdict_is_made_once_per_distinct_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    icc.verdicts.clear()
    calls: list[int] = []
    real = icc.delta_e

    def counted(profile: bytes) -> float | None:
        calls.append(len(profile))
        return real(profile)

    monkeypatch.setattr(icc, "delta_e", counted)
    for _ in range(3):
        assert icc.is_srgb(bytes(bytearray(C2)))  # equal bytes, another object each time
        assert not icc.is_srgb(ADOBE_RGB)
    assert calls == [len(C2), len(ADOBE_RGB)] and len(icc.verdicts) == 2


def test_an_srgb_tagged_jpeg_is_compressed_as_if_untagged() -> None:
    """The transform is skipped: the same bytes as the same pixels with no profile."""
    compress.configure()
    pixels = _patches()
    untagged = compress.compress(_tagged_jpeg(pixels, None), compress.Limits())
    for profile in (C2, _libvips_profile("srgb")):
        source = _tagged_jpeg(pixels, profile)
        assert not compress._needs_transform(pyvips.Image.new_from_buffer(source, ""))
        assert compress.compress(source, compress.Limits()).data == untagged.data
    adobe = _tagged_jpeg(_in_space(ADOBE_RGB), ADOBE_RGB)
    assert compress._needs_transform(pyvips.Image.new_from_buffer(adobe, ""))


WIDE = [("Adobe RGB", ADOBE_RGB), ("Display P3", _libvips_profile("p3")), ("ProPhoto RGB", PROPHOTO)]


@pytest.mark.parametrize(("name", "profile"), WIDE)
def test_wide_gamut_sources_come_out_in_their_srgb_colours(name: str, profile: bytes) -> None:
    """Lossless (PNG in, palette PNG out): the colours exactly, but for rounding."""
    compress.configure()
    held = _in_space(profile).copy()
    expected = _centres(_patches())
    # The test could fail: read as sRGB, the source's own values are far from the colours.
    assert _furthest(_centres(held), expected) > 40, name
    held.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    data = bytes(held.pngsave_buffer(keep=pyvips.enums.ForeignKeep.ICC))
    result = compress.compress(data, compress.Limits())
    out = pyvips.Image.new_from_buffer(result.data, "")
    assert result.format_out == "png" and out.get_typeof("icc-profile-data") == 0
    assert _furthest(_centres(out.colourspace("srgb")), expected) <= 3, name


@pytest.mark.parametrize(("name", "profile"), WIDE)
def test_wide_gamut_jpegs_come_out_near_their_srgb_colours(name: str, profile: bytes) -> None:
    """A JPEG at half quality moves colours a little by itself (the same pixels in sRGB
    are the reference), and a wide space magnifies that; but nowhere near as far as
    the untransformed values are."""
    compress.configure()
    untagged = compress.compress(_tagged_jpeg(_patches(), None), compress.Limits())
    expected = _centres(pyvips.Image.new_from_buffer(untagged.data, ""))
    result = compress.compress(_tagged_jpeg(_in_space(profile), profile), compress.Limits())
    out = pyvips.Image.new_from_buffer(result.data, "")
    assert out.get_typeof("icc-profile-data") == 0
    assert _furthest(_centres(out), expected) <= 20, name
    assert _furthest(_centres(_in_space(profile)), expected) > 40, name


def test_cmyk_with_a_profile_comes_out_in_its_srgb_colours() -> None:
    compress.configure()
    cmyk = _patches().icc_export(output_profile="cmyk", intent="relative")
    data = bytes(cmyk.jpegsave_buffer(Q=95, keep=pyvips.enums.ForeignKeep.ICC))
    source = pyvips.Image.new_from_buffer(data, "")
    assert (source.interpretation, source.bands) == ("cmyk", 4)
    # What the ink can print of each colour, back in sRGB: near the colours, not them.
    printable = _centres(source.icc_transform("srgb", embedded=True, intent=icc.INTENT))
    assert _furthest(printable, _centres(_patches())) <= 80
    result = compress.compress(data, compress.Limits())
    out = pyvips.Image.new_from_buffer(result.data, "")
    assert (out.interpretation, out.bands) == ("srgb", 3)
    assert _furthest(_centres(out), printable) <= 6

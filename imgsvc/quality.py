"""The quality rule: what quality an output is encoded at. Pure: bytes in, numbers out.

"Half of its original quality": a JPEG's quality is estimated from its luminance
quantization table, by inverting the IJG scaling that libjpeg, mozjpeg and most
cameras and editors use; WebP and AVIF have no table to read, so their encoders'
nominal defaults stand in; then the factor (0.5 unless configured) is applied.
"""

from __future__ import annotations

# The IJG standard luminance table (ITU T.81, Annex K). The estimate compares sums,
# so the order (natural here, zig-zag in a file) does not matter.
_STD_LUMINANCE = (
    16,
    11,
    10,
    16,
    24,
    40,
    51,
    61,
    12,
    12,
    14,
    19,
    26,
    58,
    60,
    55,
    14,
    13,
    16,
    24,
    40,
    57,
    69,
    56,
    14,
    17,
    22,
    29,
    51,
    87,
    80,
    62,
    18,
    22,
    37,
    56,
    68,
    109,
    103,
    77,
    24,
    35,
    55,
    64,
    81,
    104,
    113,
    92,
    49,
    64,
    78,
    87,
    103,
    121,
    120,
    101,
    72,
    92,
    95,
    98,
    112,
    100,
    103,
    99,
)

#: Encoders' nominal qualities, used where the bytes carry no quality to read.
NOMINAL_QUALITY = {"webp": 75, "avif": 50, "heif": 50}
#: Quality of a lossless source: everything was kept.
LOSSLESS_QUALITY = 100
#: The PNG palette quantiser's quality (libimagequant) for "half quality".
PNG_PALETTE_QUALITY = 50
#: GIF's "half quality": 7 bits a pixel, half of the 256 colours a palette can hold.
GIF_BITDEPTH = 7


def jpeg_quantization_tables(data: bytes) -> dict[int, tuple[int, ...]]:
    """The DQT tables of a JPEG, by table id, each as 64 values; {} if none are found."""
    tables: dict[int, tuple[int, ...]] = {}
    if data[:2] != b"\xff\xd8":
        return tables
    pos = 2
    size = len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan or end of image: tables come before
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xDB:
            _read_dqt(segment, tables)
        pos += 2 + length
    return tables


def _read_dqt(segment: bytes, tables: dict[int, tuple[int, ...]]) -> None:
    i = 0
    while i < len(segment):
        precision, table_id = segment[i] >> 4, segment[i] & 0x0F
        i += 1
        if precision == 0:
            values = tuple(segment[i : i + 64])
            i += 64
        else:
            values = tuple(int.from_bytes(segment[j : j + 2], "big") for j in range(i, i + 128, 2))
            i += 128
        if len(values) == 64:
            tables[table_id] = values


def _ijg_table_sum(quality: int) -> int:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return sum(min(255, max(1, (v * scale + 50) // 100)) for v in _STD_LUMINANCE)


# The sum of libjpeg's luminance table at each quality, clamping included.
_IJG_SUMS = {quality: _ijg_table_sum(quality) for quality in range(1, 101)}


def estimate_jpeg_quality(data: bytes) -> int | None:
    """The IJG quality (1-100) whose luminance table is nearest this JPEG's, or None."""
    table = jpeg_quantization_tables(data).get(0)
    if table is None:
        return None
    total = sum(table)
    return min(_IJG_SUMS, key=lambda quality: (abs(_IJG_SUMS[quality] - total), -quality))


def target_quality(source_quality: int, factor: float, floor: int = 1) -> int:
    """The output quality for a source of ``source_quality``: the factor of it, but not
    below ``floor`` (nor above the source's own quality, where that is lower).

    The floor is what keeps an image of ours that was re-encoded elsewhere (a CDN, an
    editor: its bytes no longer match our outputs) from being halved again and again:
    a second pass lands on the floor and goes no lower."""
    return max(1, min(100, max(round(source_quality * factor), min(floor, source_quality))))

"""The images a run uses: a folder of files, cycled to reach N, grouped by size class."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pyvips

BUNDLED = Path(__file__).parent / "images"
EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif"})


@dataclasses.dataclass(frozen=True, slots=True)
class SizeClass:
    """A range of source megapixels, [low, high)."""

    key: str
    label: str
    low: float
    high: float
    always: bool  # reported even when it has no images


# Upper bounds are a little above the round numbers, so 3.0 MP and 24.0 MP photos
# (2000x1500, 6000x4000) fall in the class their name promises.
CLASSES: tuple[SizeClass, ...] = (
    SizeClass("small", "small (<1 MP)", 0.0, 1.0, always=False),
    SizeClass("ecommerce", "e-commerce (1-3 MP)", 1.0, 3.001, always=True),
    SizeClass("medium", "medium (3-12 MP)", 3.001, 12.0, always=False),
    SizeClass("large", "large (12-24 MP)", 12.0, 24.001, always=True),
    SizeClass("huge", "huge (>24 MP)", 24.001, float("inf"), always=False),
)


def classify(megapixels: float) -> SizeClass:
    """The size class of an image of ``megapixels``."""
    for size_class in CLASSES:
        if size_class.low <= megapixels < size_class.high:
            return size_class
    return CLASSES[-1]


@dataclasses.dataclass(frozen=True, slots=True)
class SourceFile:
    """One distinct file of the folder, read once."""

    name: str
    # Not in the repr: at the end of asyncio.run, Python 3.11 formats the repr of the
    # run's result (through its SIGINT handler), and the bytes of a run of large photos
    # ran to gigabytes.
    data: bytes = dataclasses.field(repr=False)
    width: int
    height: int
    format: str
    has_icc: bool
    orientation: int

    @property
    def megapixels(self) -> float:
        """Source megapixels (one frame)."""
        return self.width * self.height / 1e6

    @property
    def size_class(self) -> SizeClass:
        """Its size class."""
        return classify(self.megapixels)


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One image of a run: the index makes each URL unique, the file gives the bytes."""

    index: int
    file: SourceFile


def read_folder(folder: Path) -> list[SourceFile]:
    """Every image file of ``folder`` (not recursive) that libvips can read a header of."""
    if not folder.is_dir():
        raise SystemExit(f"bench: {folder} is not a folder")
    files: list[SourceFile] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in EXTENSIONS:
            continue
        data = path.read_bytes()
        try:
            header = pyvips.Image.new_from_buffer(data, "")
        except pyvips.Error:
            print(f"bench: skipping {path.name}: libvips cannot read it")
            continue
        orientation = int(header.get("orientation")) if header.get_typeof("orientation") else 1
        files.append(
            SourceFile(
                name=path.name,
                data=data,
                width=header.width,
                height=header.get_page_height(),
                format=str(header.get("vips-loader")).removesuffix("load_buffer"),
                has_icc=bool(header.get_typeof("icc-profile-data")),
                orientation=orientation,
            )
        )
    if not files:
        raise SystemExit(f"bench: no readable images in {folder}")
    return files


def cycle(files: Sequence[SourceFile], count: int) -> list[Item]:
    """``count`` items, going round ``files`` in name order."""
    return [Item(index=i + 1, file=files[i % len(files)]) for i in range(count)]


def by_class(items: Sequence[Item]) -> dict[str, list[Item]]:
    """Items grouped by size-class key, in class order; classes without items are absent."""
    groups: dict[str, list[Item]] = {c.key: [] for c in CLASSES}
    for item in items:
        groups[item.file.size_class.key].append(item)
    return {key: group for key, group in groups.items() if group}


def megapixels(items: Sequence[Item]) -> float:
    """Total source megapixels of ``items``."""
    return sum(item.file.megapixels for item in items)


def source_bytes(items: Sequence[Item]) -> int:
    """Total source bytes of ``items``."""
    return sum(len(item.file.data) for item in items)

"""imgsvc: compress product images in bulk from a CSV of URLs."""

from importlib import metadata

try:
    # pyproject.toml holds the version; the installed package's metadata carries it.
    __version__ = metadata.version("imgsvc")
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

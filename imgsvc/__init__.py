"""imgsvc: compress product images in bulk from a CSV of URLs."""

__version__ = "0.1.0"

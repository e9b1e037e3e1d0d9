"""Every file of the image corpus through the running service: each comes out right
(decodable, upright, sRGB, smaller) or fails with a reason a person can read, and the
service stays up within bounded memory.

The corpus is an option: IMGSVC_TEST_CORPUS, by default the shared/corpus folder
beside this repository. Without it, only the files committed under tests/images run.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pyvips
from PIL import Image as PillowImage

from imgsvc import localdb
from tests.e2e.processes import (
    Process,
    post_csv,
    service_env,
    serving,
    wait_for_final,
)
from tests.servers import IMAGES, ImageServer, S3Server

REPOSITORY = Path(__file__).parents[2]
CORPUS = Path(os.environ.get("IMGSVC_TEST_CORPUS", REPOSITORY.parent / "shared" / "corpus"))

# Valid files that this build cannot read, and why (the reason the image fails with).
UNREADABLE = {
    "avif_animated_alpha_exif.avif": "not an image in a supported format",  # animated AVIF sequence
    "heic_iphone11pro_p3.heic": "HEVC",
    "heic_libheif_example.heic": "HEVC",
    "heif_alpha_gopher.heif": "HEVC",
    "jp2_relax.jp2": "not an image in a supported format",
    "jxl_isobmff.jxl": "not an image in a supported format",
    "jpeg_12bit_monkey12.jpg": "precision 12",
    "svg_check.svg": "SVG images are not accepted",
    "svg_commons-logo.svg": "SVG images are not accepted",
    "svg_embedded_raster_struct-image-04-t.svg": "SVG images are not accepted",
    "svg_systemLanguage_Speech_bubbles.svg": "not an image in a supported format",  # UTF-16: unreadable
    "svgz_logo.svgz": "not an image in a supported format",
}


def hostile_names() -> set[str]:
    """The files of the corpus's bad/ folder that tests/images holds a copy of, by its
    manifest: the only committed files allowed to fail."""
    rows = (IMAGES / "MANIFEST.tsv").read_text().splitlines()[1:]
    return {Path(row.split("\t")[0]).name for row in rows if row.startswith("bad/")}


def folders() -> list[Any]:
    shared = [
        pytest.param(
            [CORPUS / "bad", CORPUS / "formats"],
            id="shared-corpus",
            marks=pytest.mark.skipif(
                not (CORPUS / "formats").is_dir(), reason=f"no image corpus at {CORPUS} (IMGSVC_TEST_CORPUS)"
            ),
        )
    ]
    return [pytest.param([IMAGES], id="committed"), *shared]


def all_frames(data: bytes) -> pyvips.Image:
    """An image with every frame, for the loaders that have frames."""
    try:
        return pyvips.Image.new_from_buffer(data, "", n=-1)
    except pyvips.Error:
        return pyvips.Image.new_from_buffer(data, "")


def expected_size(data: bytes) -> tuple[int, int] | None:
    """The upright size of one frame of a source, as its header declares it."""
    try:
        image = all_frames(data)
        width, height = image.width, image.get_page_height()
        orientation = image.get("orientation") if image.get_typeof("orientation") else 1
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    except pyvips.Error:
        try:
            with PillowImage.open(io.BytesIO(data)) as source:
                return source.size
        except Exception:
            return None


@pytest.fixture
def corpus_service(
    request: pytest.FixtureRequest, database_url: str, s3: S3Server, tmp_path: Path
) -> Iterator[tuple[str, Process]]:
    port = localdb.free_port()
    env = service_env(database_url, s3, tmp_path, port) | {"IMGSVC_MAX_ROWS": "1000"}
    with serving(env, tmp_path / "serve.log") as (base, process):
        yield base, process


@pytest.mark.timeout(600)
@pytest.mark.parametrize("roots", folders())
async def test_every_corpus_file_comes_out_right_or_fails_with_a_reason(
    roots: list[Path], corpus_service: tuple[str, Process], s3: S3Server
) -> None:
    base, process = corpus_service
    servers = [ImageServer(root) for root in roots]
    for server in servers:
        server.start()
    try:
        files = [
            (server, path)
            for server in servers
            for path in sorted(server.root.iterdir())
            if path.is_file() and path.suffix not in (".tsv", ".md")
        ]
        rows = "".join(
            f'{n},"{path.name}",{server.url("/img/" + path.name)}\n'
            for n, (server, path) in enumerate(files, start=1)
        )
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(
                session, base, ("S. No.,Product Name,Input Image Urls\n" + rows).encode()
            )
            assert status == 202, accepted
            await wait_for_final(session, accepted["status_url"], seconds=500)
            async with session.get(accepted["status_url"] + "?per_page=500") as response:
                final = await response.json()
    finally:
        for server in servers:
            server.stop()
    assert final["counts"]["total"] == len(files)
    outcomes = {p["name"]: p["images"][0] for p in final["products"]}
    problems = []
    for _, path in files:
        image = outcomes[path.name]
        source = path.read_bytes()
        if image["status"] == "failed":
            error = str(image["error"])
            if not error or "internal error" in error or "Traceback" in error or len(error) > 300:
                problems.append(f"{path.name}: unclear reason {error!r}")
            if path.name in UNREADABLE and UNREADABLE[path.name] not in error:
                problems.append(f"{path.name}: expected {UNREADABLE[path.name]!r}, got {error!r}")
            expected = path.parent.name == "bad" or path.name in hostile_names() or path.name in UNREADABLE
            if not expected:
                problems.append(f"{path.name}: a valid file failed: {error}")
            continue
        assert image["status"] == "done", image
        data, content_type = s3.get(image["output_url"].split(f"/{s3.bucket}/", 1)[1])
        out = all_frames(data)
        out.avg()  # decodes every pixel
        if out.interpretation not in ("srgb", "b-w"):
            problems.append(f"{path.name}: output in {out.interpretation}")
        if image["kept_original"]:
            if data != source:
                problems.append(f"{path.name}: kept_original but the bytes differ")
        elif len(data) >= len(source) and image["format_out"] == image["format_in"]:
            problems.append(f"{path.name}: {len(data)} bytes out for {len(source)} in")
        size = expected_size(source)
        if size is not None and (out.width, out.get_page_height()) != size:
            problems.append(f"{path.name}: {out.width}x{out.get_page_height()}, expected {size}")
        if content_type != f"image/{image['format_out']}" and image["format_out"] != "ico":
            problems.append(f"{path.name}: Content-Type {content_type}")
    assert not problems, "\n".join(problems)
    peak_mib = int(Path(f"/proc/{process.popen.pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    assert peak_mib < 1536, f"the service peaked at {peak_mib:.0f} MiB"

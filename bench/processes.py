"""`python -m bench.processes`: images a second through the whole pipeline with
`imgsvc worker --processes N` for each N given, on tiny images (the event loop's
work, the codec costs nothing) and on 2 MP photos (the codec's).

    python -m bench.processes --counts 1 2 --repeat 3 --tiny 1500 --photos 80

Each run starts a fresh worker with N processes beside the same API, PostgreSQL, S3
server and image server, sends one CSV (``reprocess``, so nothing is reused from an
earlier run), and times it from the upload to the request's end. The counts take turns
within each repeat, so that a machine shared with other work disturbs all of them
alike. Every source is a file of its own bytes (a copy with a trailer after the end
of the image), so every image is downloaded, compressed and stored. It prints one
line a run and the median of each, with the worker's CPU per image and its peak
memory (PSS of the whole process tree).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import pyvips

from bench import procstat
from bench.services import Services

PHOTO = Path(__file__).parent / "images" / "bimg_northern_cardinal_bird.jpg"  # 1920x1080


def make_sources(folder: Path, tiny: int, photos: int) -> tuple[list[str], list[str]]:
    """Files of distinct bytes: ``tiny`` 64x48 JPEGs and ``photos`` copies of a 2 MP photo."""
    small = pyvips.Image.gaussnoise(64, 48).cast("uchar").bandjoin([128, 64]).copy(interpretation="srgb")
    tiny_bytes = small.jpegsave_buffer(Q=90)
    photo_bytes = PHOTO.read_bytes()
    names: tuple[list[str], list[str]] = ([], [])
    for kind, body, count, out in (
        ("tiny", tiny_bytes, tiny, names[0]),
        ("photo", photo_bytes, photos, names[1]),
    ):
        for n in range(count):
            name = f"{kind}-{n:05d}.jpg"
            (folder / name).write_bytes(body + f"\n{kind} {n}\n".encode())
            out.append(name)
    return names


def loop_seconds(root: int) -> float:
    """CPU seconds of the main thread (the event loop) of every process in ``root``'s tree."""
    total = 0
    for pid in procstat.tree(root):
        try:
            fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def csv_body(services: Services, names: list[str], run: int) -> bytes:
    rows = "".join(
        f'{n + 1},P{n + 1},"{services.image_url(run * 100_000 + n, name)}"\n' for n, name in enumerate(names)
    )
    return ("S. No.,Product Name,Input Image Urls\n" + rows).encode()


class TreePeak:
    """The peak PSS of a process tree, sampled every 0.2 s on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, procstat.tree_pss_kib(self.pid))

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


async def run_batch(services: Services, body: bytes, seconds: float) -> float:
    """Upload ``body`` and wait for its request to end; the seconds it took."""
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("file", body, filename="bench.csv", content_type="text/csv")
        form.add_field("reprocess", "true")
        started = time.monotonic()
        async with session.post(services.api_base + "/upload", data=form) as response:
            accepted = await response.json()
            assert response.status == 202, accepted
        while time.monotonic() - started < seconds:
            async with session.get(accepted["status_url"] + "?per_page=1") as response:
                status = await response.json()
            if status["status"] not in ("queued", "processing"):
                assert status["counts"]["failed"] == 0, status["counts"]
                return time.monotonic() - started
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the batch did not end in {seconds} s")


def start_worker(services: Services, processes: int) -> None:
    """Replace the services' worker with one of ``processes`` processes, started."""
    for child in [c for c in services.children if c.name == "worker"]:
        child.stop(60)
        services.children.remove(child)
    args = [sys.executable, "-m", "imgsvc", "worker", "--processes", str(processes)]
    worker = services._spawn("worker", args, services.service_env())
    deadline = time.monotonic() + 60
    while worker.log.read_text(errors="replace").count("worker started") < processes:
        if worker.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start:\n{worker.tail()}")
        time.sleep(0.1)


def main() -> None:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(prog="python -m bench.processes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2], help="worker processes to compare")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each count and kind (3)")
    parser.add_argument("--tiny", type=int, default=1500, help="tiny images a run (1500); 0 to skip")
    parser.add_argument("--photos", type=int, default=80, help="2 MP photos a run (80); 0 to skip")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgsvc-procs-") as folder:
        tiny, photos = make_sources(Path(folder), args.tiny, args.photos)
        services = Services(Path(folder))
        services.start()
        results: dict[tuple[str, int], list[tuple[float, float, int, float]]] = {}
        try:
            run = 0
            for repeat in range(args.repeat):
                for kind, names in (("tiny", tiny), ("photo", photos)):
                    if not names:
                        continue
                    for processes in args.counts if repeat % 2 == 0 else args.counts[::-1]:
                        start_worker(services, processes)
                        run += 1
                        roots = {"worker": services.child("worker").popen.pid}
                        before = procstat.cpu_seconds(roots)["worker"]
                        loop_before = loop_seconds(roots["worker"])
                        with TreePeak(roots["worker"]) as peak:
                            seconds = asyncio.run(run_batch(services, csv_body(services, names, run), 600))
                        cpu = procstat.cpu_seconds(roots)["worker"] - before
                        loop = loop_seconds(roots["worker"]) - loop_before
                        rate = len(names) / seconds
                        per_image = 1000 * cpu / len(names)
                        loop_ms = 1000 * loop / len(names)
                        results.setdefault((kind, processes), []).append(
                            (rate, per_image, peak.peak, loop_ms)
                        )
                        print(
                            f"{kind:5} processes={processes} run {repeat + 1}: {rate:6.1f} images/s, "
                            f"worker {per_image:5.1f} CPU ms/image (event loops {loop_ms:4.1f}), "
                            f"peak {peak.peak / 1024:4.0f} MiB",
                            flush=True,
                        )
        finally:
            services.stop()
    print("median of each:")
    for (kind, processes), rows in results.items():
        print(
            f"{kind:5} processes={processes}: {statistics.median(r[0] for r in rows):6.1f} images/s, "
            f"worker {statistics.median(r[1] for r in rows):5.1f} CPU ms/image "
            f"(event loops {statistics.median(r[3] for r in rows):4.1f}), "
            f"peak {max(r[2] for r in rows) / 1024:4.0f} MiB"
        )


if __name__ == "__main__":
    main()

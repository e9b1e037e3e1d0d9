"""`make bench` as a person runs it, shrunk to a few images: every phase, its JSON, its
exit code. No timing is asserted here (the figures of a run this short mean nothing);
what is checked is that each phase measured the thing it names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import pgstat
from imgsvc import localdb

ROOT = Path(__file__).resolve().parents[2]

# Every phase, each as short as it goes: 3 images a request, 1-second latency load,
# 1 pass of each ceiling variant, a 50-row CSV twice and a CSV of just under 1 MiB.
SHORT = [
    "--images", "3", "--repeat", "1", "--warmup", "1", "--rounds", "1",
    "--ceiling-seconds", "0.05", "--latency-seconds", "1",
    "--upload-rows", "50", "--upload-repeat", "2", "--large-csv-mb", "1", "--rerun-images", "4",
    "--tiny-images", "20",
]  # fmt: skip


def bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return done, out


def test_every_phase_measures_the_pipeline_and_writes_table_and_json(tmp_path: Path) -> None:
    statements = pgstat.available(localdb.find_bindir())  # the module is in PostgreSQL's contrib
    done, out = bench(tmp_path, *SHORT, *(["--pg-statements"] if statements else []))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results: dict[str, Any] = json.loads(out.read_text())

    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0
    assert machine["postgresql"] != "?" and machine["rclone"] != "?"  # each read from the server it ran

    # The committed set's first three files are 1-3 MP photos: one class, one request of 3.
    (measured,) = results["pipeline"]["throughput"]
    assert measured["group"] == "ecommerce" and measured["status"] == "completed"
    assert measured["counts"] == {
        "total": 3, "queued": 0, "processing": 0, "done": 3, "failed": 0, "cancelled": 0,
    }  # fmt: skip
    assert 0 < measured["bytes_out"] < measured["bytes_in"]  # half the quality is smaller
    assert measured["images_per_s"] > 0
    assert measured["paired_ceiling"]["images"] == 3 and measured["paired_ceiling"]["failures"] == 0
    assert set(measured["cpu_seconds"]) == {"api", "worker", "postgres", "s3 (rclone)", "image server"}
    assert measured["cpu_seconds"]["worker"] > 0
    assert {"api", "worker"} <= set(measured["peak_rss_kib"])

    rows = {row["group"]: row for row in results["summary"]}
    assert rows["large"]["images"] == 0 and rows["all"]["images"] == 3
    # The ratio's denominator is the bare loop that makes the service's bytes, measured
    # beside the other loop and compress() on the same images; none failed an image.
    ways = results["codec"]["three_way"]["ecommerce"]
    assert set(ways) == {"plain", "optimize", "service"}
    assert all(way["failures"] == 0 and way["distinct_images"] == 3 for way in ways.values())
    matched = results["codec"]["matched"]["ecommerce"]
    ceiling = results["codec"]["ceiling"]["ecommerce"]
    assert ceiling["variant"] == matched["loop"] == "optimize" and matched["same_bytes"]
    assert rows["ecommerce"]["ceiling_images_per_s"] == pytest.approx(ceiling["images_per_s"], rel=1e-3)
    (three_way,) = results["three_way"]
    assert three_way["service_over_loop"] == matched["service_over_loop"] > 0
    assert "Ceiling three ways" in done.stdout

    # The ceiling's encode settings, one added at a time, end with the service's own.
    variants = [v["variant"] for v in results["codec"]["variants"]["ecommerce"]]
    assert variants[0] == "plain" and variants[-1] == "service"
    assert all(v["failures"] == 0 for v in results["codec"]["variants"]["ecommerce"])

    # Open-loop latency: every probe answered, none failed.
    latency = {probe["name"]: probe for probe in results["pipeline"]["latency"]}
    status = latency["GET /status/{id}"]
    assert status["sent"] > 0 and status["ok"] == status["sent"] and status["failed"] == 0
    assert results["pipeline"]["latency_batch"]["status"] == "completed"

    # Re-run: the unchanged catalog is answered by 304s, with nothing compressed or stored;
    # with one source changed, that one alone is downloaded and compressed again.
    rerun = {r["run"]: r for r in results["rerun"]["runs"]}
    assert results["rerun"]["changed"] == 1
    first, unchanged, changed, alone = (
        rerun[k] for k in ("first", "unchanged", "1% changed", "changed only")
    )
    assert (first["downloads"], first["compressed"], first["reused"]) == (4, 4, 0)
    assert (unchanged["downloads"], unchanged["not_modified"], unchanged["compressed"]) == (0, 4, 0)
    assert unchanged["stored"] == 0 and unchanged["reused"] == 4
    assert (changed["downloads"], changed["not_modified"], changed["compressed"], changed["reused"]) == (
        1,
        3,
        1,
        3,
    )
    assert (alone["downloads"], alone["compressed"]) == (1, 1)
    assert "Re-run: a catalog of 4 images" in done.stdout

    # Tiny images: each downloaded, compressed and stored; the CPU of every process tree.
    tiny = results["tiny"]
    assert tiny["images"] == 20 and tiny["images_per_second"] > 0
    assert set(tiny["cpu_ms_per_image"]) == {"api", "worker", "postgres", "s3 (rclone)", "image server"}
    assert tiny["cpu_ms_per_image"]["worker"] > 0
    # Sent again while other load disturbed it; the least disturbed request is kept.
    assert 1 <= tiny["attempts"] == len(tiny["attempts_foreign_cores"]) <= 4
    assert tiny["foreign_cores"] == min(tiny["attempts_foreign_cores"])
    assert "Tiny images: 20 distinct 64x48 JPEGs" in done.stdout
    if statements:  # PostgreSQL's time by statement: recording the images is among it
        assert any("json_to_recordset" in row["query"] for row in tiny["statements"])
        assert any("json_to_recordset" in row["query"] for row in results["rerun"]["unchanged_statements"])
        assert "PostgreSQL's time by statement, tiny images" in done.stdout

    # Each measured request waited until nothing an earlier one left was open or running.
    quiet = results["pipeline"]["quiet"]
    assert {"throughput ecommerce 1", "latency", "re-run first", "tiny", "large uploads"} <= set(quiet)
    for phase, found in quiet.items():
        assert found["quiet"], (phase, found)
        assert not any(found["pending_at_last"].values()), (phase, found)
        assert found["tables"]["images"]["bytes"] > 0
    assert "Quiet before each request" in done.stdout

    large = results["large_uploads"]
    assert large["worker_stopped"] and large["worker_exit_code"] == 0
    assert large["rows_upload"]["accepted"] == 2
    assert [a["status"] for a in large["rows_upload"]["answers"]] == [202, 202]
    assert large["rows_upload"]["csv"]["rows"] == 50 and large["large_csv"]["accepted"]
    assert 0.5 < large["large_csv"]["csv"]["mib"] < 1

    # The table a person reads says the same.
    assert "e-commerce (1-3 MP)" in done.stdout and "GET /status/{id}" in done.stdout
    assert "Large uploads" in done.stdout and f"JSON: {out}" in done.stdout


def test_a_request_that_does_not_complete_fails_the_run(tmp_path: Path) -> None:
    # Every image is over the pixel limit given to the service, so the request fails:
    # its "throughput" would measure refusals, and the run must say so and exit 1.
    done, out = bench(
        tmp_path, *SHORT, "--no-latency", "--no-settings", "--no-large-uploads", "--rerun-images", "0",
        "--tiny-images", "0", "--env", "IMGSVC_MAX_PIXELS=1000",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    assert "the ecommerce request ended failed" in done.stderr
    assert "the limit is 1,000 (IMGSVC_MAX_PIXELS)" in done.stderr
    (measured,) = json.loads(out.read_text())["pipeline"]["throughput"]
    assert measured["counts"]["failed"] == 3

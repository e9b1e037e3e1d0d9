"""The command line as a person at a terminal uses it: submit, wait, status, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imgsvc import localdb
from tests.servers import ImageServer


def imgsvc(*args: str, server: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgsvc", *args, "--server", server],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_submit_waits_with_progress_then_summarises(
    service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    csv_file = tmp_path / "products.csv"
    csv_file.write_text(
        "S. No.,Product Name,Input Image Urls\n"
        f"1,Parrots,{image_server.url('/slow/300/kodak_kodim23.png')}\n"
        f"2,Missing,{image_server.url('/status/404')}\n"
    )
    done = imgsvc("submit", str(csv_file), "--wait", server=service)
    assert done.returncode == 3, done.stdout + done.stderr  # completed with errors
    lines = done.stdout.splitlines()
    request_id = lines[0].split()[1].rstrip(":")
    assert lines[0] == f"request {request_id}: 2 products, 2 images"
    assert any(line.startswith("[####") and "100%  2/2  done 1  failed 1" in line for line in lines)
    assert "completed_with_errors: 1 done, 1 failed of 2 images" in done.stdout
    assert "output CSV: " in done.stdout and f"{request_id}/output.csv" in done.stdout
    assert "failed: 2 " in done.stdout and "the source answered HTTP 404 Not Found" in done.stdout

    shown = imgsvc("status", request_id, server=service)
    assert shown.returncode == 3 and "completed_with_errors" in shown.stdout

    quick = imgsvc("submit", str(csv_file), server=service)
    assert quick.returncode == 0 and quick.stdout.startswith("request ") and "[" not in quick.stdout


def test_refusals_and_errors_exit_non_zero_with_a_message(service: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("S. No.,Product Name,Input Image Urls\n1,,ftp://x/y.jpg\n")
    refused = imgsvc("submit", str(bad), server=service)
    assert refused.returncode == 1
    assert (
        "HTTP 422" in refused.stderr and "line 2, Product Name: the product name is empty" in refused.stderr
    )
    missing = imgsvc("status", "00000000-0000-4000-8000-000000000000", server=service)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    absent = imgsvc("submit", str(tmp_path / "nope.csv"), server=service)
    assert absent.returncode == 1 and "no such file" in absent.stderr
    nobody = imgsvc("status", "x", server=f"http://127.0.0.1:{localdb.free_port()}")
    assert nobody.returncode == 1 and "cannot reach the server" in nobody.stderr
    for result in (refused, missing, absent, nobody):
        assert "Traceback" not in result.stderr

"""The OpenAPI document matches the real API: schemathesis generates requests from it
and checks every answer (no server errors, documented statuses, content types and
bodies, Allow on 405, malformed input refused). Every body schema is generated from
its shape in responses.py with ``required`` and ``additionalProperties: false``, so an
undeclared or missing key in any answer fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from imgsvc import localdb, openapi
from tests.e2e.processes import Process, assert_clean_exit, service_env, wait_until_up
from tests.servers import S3Server


def test_the_api_answers_as_its_openapi_document_says(
    database_url: str, s3: S3Server, tmp_path: Path
) -> None:
    port = localdb.free_port()
    env = service_env(database_url, s3, tmp_path, port)
    # No worker and no webhook secret: nothing the generator invents is ever fetched,
    # and invented webhook hosts are refused before they are looked up.
    env.pop("WEBHOOK_SECRET")
    api = Process([sys.executable, "-m", "imgsvc", "serve", "--no-worker"], env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, api)
        with urllib.request.urlopen(f"{base}/openapi.json") as served:
            schemas = json.load(served)["components"]["schemas"]
        assert schemas == openapi.components()
        assert all(schema["additionalProperties"] is False for schema in schemas.values())
        schemathesis = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run(
            [
                str(schemathesis),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "all",
                # A CSV can be valid by the schema and still wrong (a bad URL, a duplicate
                # serial); the API rightly refuses those, so "valid data is accepted" is off.
                "--exclude-checks",
                "positive_data_acceptance,ignored_auth",
                "--max-examples",
                "30",
                "--seed",
                "20261126",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**env, "SCHEMATHESIS_HOOKS": ""},
            cwd=tmp_path,  # schemathesis writes a cache folder where it runs
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "generated" in run.stdout and " passed" in run.stdout
    finally:
        assert_clean_exit(api)

"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsvc import localdb
from tests.e2e.processes import Process, assert_clean_exit, service_env, wait_until_up
from tests.servers import S3Server


@pytest.fixture
def service(database_url: str, s3: S3Server, tmp_path: Path) -> Iterator[str]:
    port = localdb.free_port()
    env = service_env(database_url, s3, tmp_path, port)
    process = Process([sys.executable, "-m", "imgsvc", "serve"], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    wait_until_up(base, process)
    yield base
    assert_clean_exit(process)

"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsvc import localdb
from tests.e2e.processes import service_env, serving
from tests.servers import S3Server


@pytest.fixture
def service(database_url: str, s3: S3Server, tmp_path: Path) -> Iterator[str]:
    with serving(service_env(database_url, s3, tmp_path, localdb.free_port()), tmp_path / "serve.log") as (
        base,
        _,
    ):
        yield base

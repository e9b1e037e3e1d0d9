"""A schema file that has landed never changes: its hash is in sql/migrations.sha256."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
SQL = ROOT / "sql"
LIST = SQL / "migrations.sha256"


def released() -> dict[str, str]:
    """File name -> sha256, from the committed list (sha256sum's format)."""
    pairs = (line.split() for line in LIST.read_text().splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


def test_every_landed_migration_file_is_unchanged() -> None:
    hashes = released()
    files = sorted(p for p in SQL.glob("[0-9][0-9][0-9]_*.sql"))
    assert files
    for path in files:
        assert path.name in hashes, (
            f"sql/{path.name} is not in sql/migrations.sha256: add a new migration file to the list "
            f"when it lands (cd sql && sha256sum {path.name} >> migrations.sha256)"
        )
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashes[path.name], (
            f"sql/{path.name} changed after it landed: restore it and fix forward with a new numbered file"
        )
    removed = sorted(set(hashes) - {p.name for p in files})
    assert not removed, f"released migration files were removed: {removed}"


def test_the_changelog_starts_with_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    headings = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert headings and headings[0].startswith(f"## {version} "), (
        f"CHANGELOG.md's first entry should be {version}, the version in pyproject.toml: {headings[:1]}"
    )

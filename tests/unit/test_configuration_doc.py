"""docs/configuration.md against the settings' declarations: the same variables, each
with the default and meaning it is declared with, and error examples that are real.

When a declaration changes, `python -m imgsvc.settings` prints the tables to paste."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgsvc import errors, settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
HEADER = ("variable", "default", "meaning")
# A variable's name, not a family of them such as IMGSVC_WEBHOOK_RETRY_*.
VARIABLE = re.compile(r"\b(?:IMGSVC|AWS)_[A-Z0-9_]+\b(?!\*)|\b(?:DATABASE_URL|WEBHOOK_URL|WEBHOOK_SECRET)\b")
# The command-line client's own defaults, read in cli.py: not settings of the service.
CLIENT_VARIABLES = {"IMGSVC_SERVER", "IMGSVC_API_KEY"}


def sections(text: str) -> dict[str, list[str]]:
    """The lines under each "## " heading ("" for those before the first)."""
    found: dict[str, list[str]] = {"": []}
    lines = found[""]
    for line in text.splitlines():
        if line.startswith("## "):
            lines = found.setdefault(line.removeprefix("## "), [])
        else:
            lines.append(line)
    return found


def rows(lines: list[str]) -> list[tuple[str, ...]]:
    """The cells of each table row, without the header and the rule under it."""
    cells = [
        tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        for line in lines
        if line.startswith("|") and not line.startswith("|---")
    ]
    return [row for row in cells if row != HEADER]


def names(variable_cell: str) -> list[str]:
    return re.findall(r"`([A-Z][A-Z0-9_]*)`", variable_cell)


PAGE = sections(DOC.read_text(encoding="utf-8"))


def test_the_page_has_one_table_a_topic_in_the_declared_order() -> None:
    with_tables = [heading for heading, lines in PAGE.items() if rows(lines)]
    assert with_tables == list(settings.TOPICS)


def test_every_declared_variable_is_on_the_page_once() -> None:
    on_page = sorted(name for lines in PAGE.values() for row in rows(lines) for name in names(row[0]))
    declared = sorted(name for _, declared in settings.declarations() for name in declared.names)
    assert on_page == declared


@pytest.mark.parametrize("topic", settings.TOPICS)
def test_each_row_is_what_its_declaration_prints(topic: str) -> None:
    assert rows(PAGE[topic]) == rows(settings.markdown_table(topic).splitlines()), (
        "docs/configuration.md differs from the declarations: `python -m imgsvc.settings` prints the tables"
    )


@pytest.mark.parametrize("topic", settings.TOPICS)
def test_a_row_that_says_see_below_has_its_note_below(topic: str) -> None:
    notes = [line for line in PAGE[topic] if not line.startswith("|")]
    for row in rows(PAGE[topic]):
        if "see below" in " ".join(row):
            first = names(row[0])[0]
            assert any(line.startswith(f"`{first}`") for line in notes), first


def test_every_variable_in_the_code_is_declared() -> None:
    declared = {name for _, declared in settings.declarations() for name in declared.names}
    for path in (ROOT / "imgsvc").glob("*.py"):
        mentioned = set(VARIABLE.findall(path.read_text(encoding="utf-8")))
        assert mentioned <= declared | CLIENT_VARIABLES, (path.name, mentioned - declared)


def test_only_settings_reads_the_environment_for_the_service() -> None:
    # cli: the client's defaults; memory: glibc's MALLOC_*; localdb: the PG* it drops.
    readers = {
        path.name
        for path in (ROOT / "imgsvc").glob("*.py")
        if re.search(r"os\.environ|getenv", path.read_text(encoding="utf-8"))
    }
    assert readers <= {"settings.py", "cli.py", "memory.py", "localdb.py"}


def test_secrets_are_marked_and_say_they_are_never_printed() -> None:
    secrets = {declared.names[0] for _, declared in settings.declarations() if declared.secret}
    assert secrets == {"AWS_SECRET_KEY", "WEBHOOK_SECRET", "IMGSVC_API_KEYS"}
    for _, declared in settings.declarations():
        assert declared.secret == ("Never printed" in declared.meaning), declared.names


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"IMGSVC_MAX_PIXELS": "lots"},
            "IMGSVC_MAX_PIXELS: expected a whole number above 0, got 'lots'",
        ),
        (
            {"WEBHOOK_SECRET": "whsec_c2VjcmV0LW9uZQ== whsec_not-base64!"},
            "WEBHOOK_SECRET: secret 2 of 2 starts with whsec_ but the rest is not base64",
        ),
        (
            {"IMGSVC_API_KEYS": "shop-a:k-shop-a-0123456789,shop-b:short,ops:k-ops-0123456789abc:admin"},
            "IMGSVC_API_KEYS: entry 2 of 3: the key is shorter than 16 characters"
            " (KEY, NAME:KEY or NAME:KEY:admin; the key is not shown)",
        ),
        (
            {"DATABASE_URL": "postgresql+psycopg://app:pw-1234@db:5432/x"},
            "DATABASE_URL: expected a postgresql:// URL, got 'postgresql+psycopg://…@db:5432/x'"
            " (credentials and query not shown)",
        ),
    ],
)
def test_the_example_errors_are_what_start_up_prints(env: dict[str, str], line: str) -> None:
    with pytest.raises(errors.SettingsError) as caught:
        settings.from_env(env)
    assert caught.value.message == line
    assert f"imgsvc: configuration error: {line}\n" in DOC.read_text(encoding="utf-8")

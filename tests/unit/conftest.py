"""Unit tests are pure: no process of their own. A test that needs one belongs in
tests/integration."""

from __future__ import annotations

import subprocess
from typing import NoReturn

import pytest


@pytest.fixture(autouse=True)
def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("a unit test started a process: move it to tests/integration")

    monkeypatch.setattr(subprocess, "Popen", refuse)

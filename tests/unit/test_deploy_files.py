"""compose.yaml and the Dockerfile stay true to the code: real subcommands, settings
that parse, the health endpoint that exists."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from imgsvc import cli, settings

ROOT = Path(__file__).parents[2]


def imgsvc_services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == "imgsvc:local"
    }


def test_compose_runs_real_subcommands_with_settings_that_parse() -> None:
    services = imgsvc_services()
    assert {"migrate", "api", "worker"} <= services.keys()
    subcommands = {
        choice
        for action in cli._parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action.choices
    }
    for name, service in services.items():
        assert service["command"][0] in subcommands, name
        config = settings.from_env({k: str(v) for k, v in service["environment"].items()})
        assert config.database_url, name
    assert services["worker"]["environment"]["IMGSVC_METRICS_PORT"] == "9100"
    assert settings.from_env({k: str(v) for k, v in services["api"]["environment"].items()}).aws_bucket_name


def test_dockerfile_runs_unprivileged_with_a_healthcheck_on_healthz() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") == 2  # build and run stages
    assert "USER 10001" in text and "/healthz" in text and "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["imgsvc"]' in text

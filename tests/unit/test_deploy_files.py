"""compose.yaml and the Dockerfile stay true to the code: real subcommands, settings
that parse, the health endpoint that exists."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
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


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword, its --flag=value options, and the rest,
    as a list when written in exec (JSON) form."""

    keyword: str
    flags: dict[str, str]
    args: str | list[str]


def dockerfile_instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile: comments and blank lines dropped, lines ending
    in a backslash joined to the next (as Docker's parser does, comments inside them too)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1]
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"a continuation runs off the end: {pending!r}"
    instructions = []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        args: str | list[str] = json.loads(rest) if rest.startswith("[") else rest
        instructions.append(Instruction(keyword.upper(), flags, args))
    return instructions


def test_dockerfile_instructions_are_read_as_docker_reads_them() -> None:
    text = (
        "# comment\nFROM a AS b\nRUN one \\\n    # inside\n    && two\n"
        'HEALTHCHECK --interval=3s \\\n  CMD ["x", "-y"]\nUSER 1\n'
    )
    assert dockerfile_instructions(text) == [
        Instruction("FROM", {}, "a AS b"),
        Instruction("RUN", {}, "one     && two"),
        Instruction("HEALTHCHECK", {"interval": "3s"}, 'CMD ["x", "-y"]'),
        Instruction("USER", {}, "1"),
    ]


def test_dockerfile_runs_unprivileged_with_a_healthcheck_on_healthz() -> None:
    instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    stages = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    assert len(stages) == 2  # build and run stages
    build, run = instructions[stages[0]], instructions[stages[1] :]
    assert isinstance(build.args, str) and build.args.split()[1:] == ["AS", "build"]
    copied = [i for i in run if i.keyword == "COPY" and i.flags.get("from") == "build"]
    assert copied, "the run stage takes nothing from the build stage"

    def last(keyword: str) -> Instruction:
        found = [i for i in run if i.keyword == keyword]
        assert found, f"no {keyword} in the run stage"
        return found[-1]

    assert last("USER").args == "10001"  # not root, and no USER after it in the run stage
    assert [i.keyword for i in run].index("USER") > [i.keyword for i in run].index("RUN")

    healthcheck = last("HEALTHCHECK")
    assert {"interval", "timeout", "retries"} <= healthcheck.flags.keys()
    assert isinstance(healthcheck.args, str)
    form, _, command = healthcheck.args.partition(" ")
    assert form == "CMD"
    probe = json.loads(command)
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "HEALTHCHECK", "exec")  # a program that runs
    assert "/healthz" in probe[2]

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint, command_line = last("ENTRYPOINT").args, last("CMD").args
    assert isinstance(entrypoint, list) and isinstance(command_line, list)  # exec form: signals reach imgsvc
    assert entrypoint == ["imgsvc"] and "imgsvc" in scripts
    assert cli._parser().parse_args(command_line).command == "serve"  # a real subcommand, real options

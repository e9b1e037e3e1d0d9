"""compose.yaml, the Dockerfile and the locks stay true to the code: real subcommands,
settings that parse, the health endpoint that exists, and an image that installs what
runs and nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def lock_pins(name: str) -> dict[str, str]:
    """The pins of a lock file, by canonical name, without the files it includes."""
    pins: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def runtime_closure(requirements: list[str]) -> set[str]:
    """Every distribution that installing ``requirements`` pulls in, read from the
    metadata of what is installed here (markers evaluated, extras followed)."""
    seen: set[str] = set()
    pending = [(Requirement(r), "") for r in requirements]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        new_extras = set(requirement.extras) | {""}
        for wanted in new_extras:
            key = f"{name}[{wanted}]"
            if key in seen:
                continue
            seen.add(key)
            pending += [(Requirement(r), wanted) for r in importlib.metadata.requires(name) or []]
    return {key.partition("[")[0] for key in seen}


def test_the_runtime_lock_pins_exactly_what_pip_install_brings() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = lock_pins("requirements.lock")
    assert set(runtime) == runtime_closure(project["project"]["dependencies"])
    direct = {canonicalize_name(Requirement(r).name): r for r in project["project"]["dependencies"]}
    for name, line in direct.items():
        assert Requirement(line).specifier.contains(runtime[name]), line
    assert "pgserver" not in runtime
    dev = lock_pins("requirements-dev.lock")
    assert not set(runtime) & set(dev), "the dev lock repeats a runtime pin"
    (local,) = project["project"]["optional-dependencies"]["local"]
    assert runtime_closure([local]) <= set(dev), "make run brings imgsvc[local] through the dev lock"
    tools = [canonicalize_name(Requirement(r).name) for r in project["dependency-groups"]["dev"]]
    assert set(tools) <= set(dev)


def test_the_docker_image_installs_the_runtime_lock_and_imgsvc_without_extras() -> None:
    instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    copied = [i.args for i in instructions if i.keyword == "COPY" and isinstance(i.args, str)]
    assert not any("requirements-dev.lock" in args for args in copied)
    runs = [i.args for i in instructions if i.keyword == "RUN" and isinstance(i.args, str)]
    commands = [part.split() for run in runs for part in run.split("&&")]
    pip = [c for c in commands if c and (Path(c[0]).name == "pip" or c[:3] == ["python", "-m", "pip"])]
    wheels = [c for c in pip if "wheel" in c and "-r" in c]
    assert [c[c.index("-r") + 1] for c in wheels] == ["requirements.lock"]
    installs = [c for c in pip if "install" in c]
    assert len(installs) == 1, installs
    assert "--no-index" in installs[0]  # only the wheels built from the lock
    assert installs[0][-1] == "imgsvc"  # no extra: no pgserver in the image
    assert not any("-r" in c and c[c.index("-r") + 1] != "requirements.lock" for c in pip)

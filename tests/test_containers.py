"""docker/: no container engine runs here, so the images and the compose file are checked against the project
instead: every command they run exists in the `copl` command line (with those options), every file they
copy exists, every COPL_* variable is a setting (or one of the few documented directory variables), the
settings they configure are valid together, and every port matches the settings' defaults."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from copl_cli.main import app
from copl_common.service_settings import env_name, load_settings, setting_fields

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SETTINGS = {env_name(name): default for name, _kind, default, _help, _unit in setting_fields()}
# COPL_* variables read outside the service settings (copl_common/settings.py): the data directory.
DIRECTORY_VARIABLES = {"COPL_HOME"}
IMAGES = {"graph": "graph.Dockerfile", "reward": "reward.Dockerfile", "reward-cuda": "reward-cuda.Dockerfile",
          "trainer": "trainer.Dockerfile"}
SERVICE_PORTS = {"graph": ("graph_port", "graph_metrics_port"), "reward": ("reward_port", "reward_metrics_port"),
                 "reward-cuda": ("reward_port", "reward_metrics_port")}


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (DOCKER / name).read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _exec_form(arguments: str) -> list[str]:
    return json.loads(arguments) if arguments.lstrip().startswith("[") else shlex.split(arguments)


def image_commands(name: str) -> list[list[str]]:
    out = []
    for instruction, arguments in dockerfile(name):
        if instruction in ("ENTRYPOINT", "CMD"):
            out.append(_exec_form(arguments))
        elif instruction == "HEALTHCHECK":
            out.append(_exec_form(arguments.split("CMD", 1)[1]))
    return out


def image_env(name: str) -> dict[str, str]:
    env = {}
    for instruction, arguments in dockerfile(name):
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(arguments))
    return env


def image_ports(name: str) -> set[int]:
    return {int(p.split("/")[0]) for instruction, a in dockerfile(name) if instruction == "EXPOSE" for p in a.split()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _service_env(compose: dict, service: str) -> dict[str, str]:
    image = compose["services"][service].get("build", {}).get("dockerfile", "")
    env = image_env(Path(image).name) if image else {}
    return {**env, **{k: str(v) for k, v in compose["services"][service].get("environment", {}).items()}}


def assert_copl_command(command: list[str]) -> None:
    """`copl SUBCOMMAND --options...` parses: the subcommand and every option exist."""
    assert command[0] == "copl", command
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, f"{command}: {result.output}"


def test_every_image_copies_files_that_exist_and_runs_the_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, _, function = project["scripts"]["copl"].partition(":")
    assert callable(getattr(import_module(module), function))
    torch_pin = next(p for p in project["optional-dependencies"]["server"] if p.startswith("torch=="))
    for name in IMAGES.values():
        pins = re.findall(r"torch==[0-9.]+", " ".join(a for i, a in dockerfile(name) if i == "RUN"))
        assert pins == [torch_pin], f"{name} installs {pins}, the server extra pins {torch_pin}"
        for instruction, arguments in dockerfile(name):
            if instruction == "COPY":
                *sources, _dest = arguments.split()
                assert all((ROOT / s).exists() for s in sources), f"{name}: COPY {arguments}"
        assert any(i == "RUN" and "'.[server]'" in a for i, a in dockerfile(name)), f"{name} installs the project"


def test_every_command_exists():
    for name in IMAGES.values():
        for command in image_commands(name):
            if command[0] == "ray":   # the Ray head: the trainer image installs ray itself
                assert any(i == "RUN" and "ray[default]==" in a for i, a in dockerfile(name))
            else:
                assert_copl_command(command)


def test_images_use_only_settings_and_valid_values():
    for image in IMAGES.values():
        env = image_env(image)
        for variable in env:
            if variable.startswith("COPL_"):
                assert variable in SETTINGS or variable in DIRECTORY_VARIABLES, f"{image}: {variable}"
        settings = {k: v for k, v in env.items() if k in SETTINGS}
        load_settings(environ={**settings, "COPL_ALLOW_INSECURE_BIND": "true"})   # values parse and validate


def test_exposed_ports_and_health_checks_match_the_settings_defaults():
    for image, fields in SERVICE_PORTS.items():
        defaults = {SETTINGS[env_name(f)] for f in fields}
        assert image_ports(IMAGES[image]) == defaults, image
        health = [c for c in image_commands(IMAGES[image]) if c[:2] == ["copl", "health"]]
        assert health and health[0][health[0].index("--target") + 1] == f"127.0.0.1:{SETTINGS[env_name(fields[0])]}"
    assert image_ports(IMAGES["trainer"]) == {6379, 8265}


def test_compose_runs_the_system_with_health_checks_volumes_and_settings(compose):
    services = compose["services"]
    assert {"postgres", "ray-head", "graph", "reward"} <= set(services)
    assert {"registry", "database"} <= set(compose["volumes"])
    assert any(v.startswith("database:") for v in services["postgres"]["volumes"])
    for name, service in services.items():
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for variable in service.get("environment", {}):
            if variable.startswith("COPL_"):
                assert variable in SETTINGS or variable in DIRECTORY_VARIABLES, f"{name}: {variable}"
    for name in ("graph", "reward"):
        env = _service_env(compose, name)
        settings = load_settings(environ={k: v for k, v in env.items() if k in SETTINGS})   # valid as composed
        port_field, metrics_field = SERVICE_PORTS[name]
        port, metrics = getattr(settings, port_field), getattr(settings, metrics_field)
        assert (port, metrics) == (SETTINGS[env_name(port_field)], SETTINGS[env_name(metrics_field)])
        published = {int(p.rsplit(":", 1)[1]) for p in services[name]["ports"]}
        assert published == {port, metrics}, name
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:4] == ["copl", "health", "--target"] and test[4] == f"127.0.0.1:{port}"
        assert_copl_command(test[1:])
        assert f"registry:{settings.registry_path}" in services[name]["volumes"], name
        assert settings.auth_file.startswith("/run/secrets/") and services[name]["secrets"] == ["copl_tokens"]
    graph_port = SETTINGS[env_name("graph_port")]
    assert _service_env(compose, "reward")["COPL_GRAPH_TARGET"] == f"graph:{graph_port}"
    assert "postgres:5432" in _service_env(compose, "graph")["COPL_DB_URL"]
    ray_head = services["ray-head"]
    assert ray_head["build"]["dockerfile"] == "docker/trainer.Dockerfile"
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    documented = re.findall(r"run --rm trainer (copl [^\n`]+)", (DOCKER / "compose.yaml").read_text())
    assert documented
    for command in documented:   # the training command its comments give
        assert_copl_command(shlex.split(command.split("#")[0]))

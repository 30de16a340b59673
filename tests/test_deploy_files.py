"""The container image and the compose file: valid, and made of the commands the tests run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tests.test_docs import _parse

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("api", "scheduler", "worker", "flower")


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"),
                           "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _command_words(command: list[str]) -> list[str]:
    """The promptbatch or celery words of a service command (unwrapping ``sh -c``)."""
    if command[:2] == ["sh", "-c"]:
        words = shlex.split(command[2].replace("$$", "$"))
        return words[1:] if words[0] == "exec" else words
    return command


def test_compose_runs_every_role_from_the_image_with_checks_secrets_and_restarts() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", *ROLES} <= set(services)
    assert services["scheduler"]["deploy"]["replicas"] == 2  # one active, one standby
    assert services["migrate"]["command"] == ["promptbatch", "migrate"]
    for role in ROLES:
        svc = services[role]
        assert svc["image"] == "promptbatch:latest" and svc["build"] == "."
        assert svc["restart"] == "unless-stopped"
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc["environment"]["PROMPTBATCH_ROLE"] == role  # the image's HEALTHCHECK
        words = _command_words(svc["command"])
        if words[0] == "promptbatch":
            _parse(words[1:])  # the CLI accepts it
        else:
            assert words[:4] == ["celery", "-A", "workers.app", "flower"]
            assert any(w.startswith("--basic_auth=") for w in words)
    for name in ("redis", "postgres"):
        assert "healthcheck" in services[name] and services[name]["restart"] == "unless-stopped"
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")


def test_the_dockerfile_builds_one_slim_non_root_image_from_the_wheel() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(stages) >= 2 and all("-slim" in s for s in stages), stages  # multi-stage
    assert re.search(r'pip wheel .*"\.\[postgres\]"', text)
    assert re.search(r'pip install .*--no-index --find-links /wheels "promptbatch\[postgres\]"',
                     text)
    user = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    health = re.search(r'^HEALTHCHECK .*\n?.*CMD \["promptbatch", "health"\]', text, flags=re.M)
    assert health, "no HEALTHCHECK running promptbatch health"
    cmd = re.search(r"^CMD (\[.*\])", text, flags=re.M)
    assert cmd
    words = yaml.safe_load(cmd.group(1))
    assert words[0] == "promptbatch"
    _parse(words[1:])
    _parse(["health", "--role", "worker"])

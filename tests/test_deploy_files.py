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
        assert words[0] == "promptbatch"
        _parse(words[1:])  # the CLI accepts it
        if role in ("scheduler", "worker"):  # Prometheus reaches them from its container
            assert words[words.index("--metrics-port") + 1] == "9464"
            assert svc["environment"]["PROMPTBATCH_METRICS_HOST"] == "0.0.0.0"
    flower = services["flower"]  # open beyond loopback only with its login
    assert flower["environment"]["PROMPTBATCH_FLOWER_BASIC_AUTH_FILE"].startswith("/run/secrets/")
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    scraped = {(c["names"][0], c["port"]) for job in prometheus["scrape_configs"]
               for c in job["dns_sd_configs"]}
    assert scraped == {("scheduler", 9464), ("worker", 9464), ("api", 8000)}
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


def _exported_metric_names() -> set[str]:
    """Every metric family the scheduler, the workers and the API export."""
    from prometheus_client import REGISTRY

    import producers.metrics
    import workers.metrics
    from jobs.stats import Count
    from scheduler.metrics import SchedulerMetrics

    assert producers.metrics and workers.metrics
    sched = SchedulerMetrics()
    sched.cluster.update({"classes": [{"class": "normal", "pending": 1, "oldest_wait_s": 1.0,
                                       "inflight": 0, "slack_s": 3.0}],
                          "workers": 1, "slots": 2, "desired_slots": 1,
                          "cooling": ["openai|gpt-4o"]},
                         [Count(kind, "SUCCEEDED", "normal", "t", "echo", "echo-1", 1)
                          for kind in ("submitted", "finished", "missed", "cache")])
    names = {f.name for f in sched.registry.collect()}
    names |= {f.name for f in REGISTRY.collect() if f.name.startswith("promptbatch_")}
    return names


def test_the_grafana_dashboard_queries_only_metrics_we_export() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy/grafana/promptbatch.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m)
            for e in exprs for m in re.findall(r"promptbatch_[a-z_]+", e)}
    exported = _exported_metric_names()
    assert used - exported == set(), "the dashboard queries metrics nobody exports"
    # Every metric we export has a panel, but for bookkeeping ones.
    assert exported - used <= {"promptbatch_scheduler_active"}


def test_the_keda_example_scales_workers_on_the_scaling_signal() -> None:
    scaled = yaml.safe_load((ROOT / "deploy/keda/scaledobject.yaml").read_text())
    assert scaled["kind"] == "ScaledObject" and scaled["apiVersion"] == "keda.sh/v1alpha1"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == "max(promptbatch_desired_worker_slots)"
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    slots = compose["services"]["worker"]["command"]
    assert trigger["metadata"]["threshold"] == slots[slots.index("--concurrency") + 1]


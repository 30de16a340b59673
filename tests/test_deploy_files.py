"""The container image and the compose file: valid, and made of the commands the tests run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

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


#: Metrics that the alert rules and the dashboard read and no code exports yet: the
#: anomaly detector's and the budgets'. The labels are those the rules use. Once the code
#: exports one, its own name and labels are what the checks below compare against: remove
#: it from here then.
PENDING_METRICS: dict[str, frozenset[str]] = {
    "promptbatch_anomaly_active": frozenset({"kind", "provider", "model", "replica"}),
    "promptbatch_anomalies_raised": frozenset({"kind", "provider", "model", "replica"}),
    "promptbatch_budget_spent_usd": frozenset({"scope", "name", "period"}),
    "promptbatch_budget_limit_usd": frozenset({"scope", "name", "period"}),
}


def exported_metric_labels() -> dict[str, frozenset[str]]:
    """Every metric family the scheduler, the workers and the API export, with its label
    names (the cluster's counters with their optional ``tenant`` label)."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import producers.metrics
    import workers.metrics
    from jobs.stats import Count
    from scheduler.metrics import SchedulerMetrics

    sched = SchedulerMetrics(tenant_label=True)
    sched.cluster.update({"classes": [{"class": "normal", "pending": 1, "oldest_wait_s": 1.0,
                                       "inflight": 0, "slack_s": 3.0}],
                          "workers": 1, "slots": 2, "desired_slots": 1,
                          "cooling": ["openai|gpt-4o"]},
                         [Count(kind, "SUCCEEDED", "normal", "t", "echo", "echo-1", 1)
                          for kind in ("submitted", "finished", "missed", "cache")])
    labels: dict[str, set[str]] = {}
    for family in [*sched.registry.collect(), *REGISTRY.collect()]:
        if family.name.startswith("promptbatch_"):
            names = labels.setdefault(family.name, set())
            for sample in family.samples:
                names.update(k for k in sample.labels if k not in ("le", "quantile"))
    wrappers = [*vars(sched).values(), *vars(workers.metrics).values(),
                *vars(producers.metrics).values()]
    for metric in wrappers:
        if isinstance(metric, MetricWrapperBase):
            labels.setdefault(metric._name, set()).update(metric._labelnames)
    return {name: frozenset(names) for name, names in labels.items()}


def _exported_metric_names() -> set[str]:
    return set(exported_metric_labels())


def _metric_families(text: str) -> set[str]:
    """The metric families a PromQL expression or a text names (not recorded series:
    ``level:promptbatch_...:op``)."""
    return {re.sub(r"_(bucket|sum|count|total)$", "", m)
            for m in re.findall(r"(?<![\w:])promptbatch_[a-z_]+", text)}


def test_the_grafana_dashboard_queries_only_metrics_we_export() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy/grafana/promptbatch.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    annotations = [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    used = {m for e in exprs for m in _metric_families(e)}
    exported = _exported_metric_names()
    unknown = {m for e in exprs + annotations for m in _metric_families(e)} - exported
    assert unknown - set(PENDING_METRICS) == set(), "the dashboard queries metrics nobody exports"
    # Every metric we export has a panel, but for bookkeeping ones.
    assert exported - used <= {"promptbatch_scheduler_active"}


def test_the_dashboard_shows_anomalies_and_marks_them_and_deadline_misses() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy/grafana/promptbatch.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(set(cells)) == len(cells), "panels overlap"
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    assert "promptbatch_anomaly_active" in exprs and "promptbatch_anomalies_raised_total" in exprs
    marks = {a["name"]: a for a in dashboard["annotations"]["list"]}
    assert "promptbatch_anomalies_raised_total" in marks["Anomalies raised"]["expr"]
    assert "promptbatch_deadline_misses_total" in marks["Deadline misses"]["expr"]
    for mark in marks.values():
        assert mark["enable"] and mark["datasource"]["uid"] == "${datasource}"


def _rules(name: str) -> list[dict[str, Any]]:
    groups = yaml.safe_load((ROOT / "deploy/prometheus" / name).read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_alert_and_recording_rules_read_only_metrics_we_export() -> None:
    recorded = {r["record"] for r in _rules("recording.yml")}
    exported = _exported_metric_names()
    for rule in _rules("recording.yml") + _rules("alerts.yml"):
        texts = [rule["expr"], *rule.get("annotations", {}).values()]
        named = {m for t in texts for m in _metric_families(t)}
        assert named - exported - set(PENDING_METRICS) == set(), (
            f"{rule.get('alert') or rule['record']} reads metrics nobody exports")
        reads = set(re.findall(r"\b[a-z_]+:[a-z0-9_:]+", rule["expr"]))
        assert reads <= recorded, f"{rule.get('alert') or rule['record']} reads series no " \
            f"recording rule writes: {reads - recorded}"


def test_prometheus_loads_the_rules_and_compose_mounts_them_beside_its_config() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["recording.yml", "alerts.yml"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    for name in ["prometheus.yml", *prometheus["rule_files"]]:
        assert (ROOT / "deploy/prometheus" / name).is_file()
        assert f"./deploy/prometheus/{name}:/etc/prometheus/{name}:ro" in volumes


def test_the_keda_example_scales_workers_on_the_scaling_signal() -> None:
    scaled = yaml.safe_load((ROOT / "deploy/keda/scaledobject.yaml").read_text())
    assert scaled["kind"] == "ScaledObject" and scaled["apiVersion"] == "keda.sh/v1alpha1"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == "max(promptbatch_desired_worker_slots)"
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    slots = compose["services"]["worker"]["command"]
    assert trigger["metadata"]["threshold"] == slots[slots.index("--concurrency") + 1]


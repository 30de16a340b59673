"""The container image and the compose file: valid, and made of the commands the tests run."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.test_docs import _parse

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("api", "scheduler", "worker", "flower")


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return compose


def _header() -> str:
    """compose.yaml's leading comment: the steps a user follows before ``up``."""
    lines = (ROOT / "compose.yaml").read_text().splitlines()
    return "\n".join(line[1:] for line in itertools.takewhile(lambda x: x.startswith("#"),
                                                               lines))


def _schema_errors(path: Path) -> str | None:
    """What check-jsonschema finds wrong with ``path`` against the Compose specification
    (its vendored schema), or None."""
    done = subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"),
                           "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    return None if done.returncode == 0 else done.stdout + done.stderr


def test_the_compose_file_is_valid_against_the_compose_specification(tmp_path: Path) -> None:
    assert _schema_errors(ROOT / "compose.yaml") is None, _schema_errors(ROOT / "compose.yaml")
    # The check sees a mistake: a misspelt key in a service.
    broken = tmp_path / "compose.yaml"
    broken.write_text((ROOT / "compose.yaml").read_text().replace(
        "    stop_grace_period: 5m", "    stop_grace_periods: 5m"))
    errors = _schema_errors(broken)
    assert errors and "stop_grace_periods" in errors


def _promptbatch_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _compose()["services"].items()
            if svc.get("image") == "promptbatch:latest"}


def _command_words(command: list[str]) -> list[str]:
    """The promptbatch or celery words of a service command (unwrapping ``sh -c``)."""
    if command[:2] == ["sh", "-c"]:
        words = shlex.split(command[2].replace("$$", "$"))
        return words[1:] if words[0] == "exec" else words
    return command


def _cli_envvars() -> set[str]:
    """Every environment variable an option of the command line reads."""
    import typer.main

    from promptbatch.cli import app

    found: set[str] = set()
    todo: list[Any] = [typer.main.get_command(app)]
    while todo:
        command = todo.pop()
        todo += list(getattr(command, "commands", {}).values())
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            found |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    return found


def test_compose_runs_every_role_from_the_image_with_checks_secrets_and_restarts() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"redis", "postgres", "migrate", *ROLES} <= set(_promptbatch_services()) | {
        "redis", "postgres"}
    assert services["scheduler"]["deploy"]["replicas"] == 2  # one active, one standby
    assert services["migrate"]["command"] == ["promptbatch", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for role in ROLES:
        svc = services[role]
        assert svc["build"] == "."
        assert svc["restart"] == "unless-stopped"
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        if role in ("scheduler", "worker"):  # Prometheus reaches them from its container
            words = _command_words(svc["command"])
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
    for name, svc in services.items():  # other images: a pinned release, never "latest"
        image = svc["image"]
        assert image == "promptbatch:latest" or (":" in image and not image.endswith(
            ":latest")), (name, image)


def test_every_promptbatch_service_runs_a_real_command_its_health_check_can_see() -> None:
    for name, svc in _promptbatch_services().items():
        words = _command_words(svc["command"])
        assert words[0] == "promptbatch", name
        _parse(words[1:])  # the command line accepts it
        if name == "migrate":
            assert svc["healthcheck"] == {"disable": True}
            continue
        env = svc["environment"]
        role = env["PROMPTBATCH_ROLE"]  # what the image's HEALTHCHECK checks
        assert role == words[1] and role in ROLES, (name, role)
        _parse(["health", role])
        if role in ("api", "flower"):  # the check asks the port the service listens on
            assert words[words.index("--port") + 1] == str(env.get("PROMPTBATCH_PORT", 8000))
            assert words[words.index("--host" if role == "api" else "--address") + 1] \
                == "0.0.0.0"


def test_compose_passes_only_settings_the_project_reads_with_valid_values() -> None:
    from config.settings import Settings

    settings = {f"PROMPTBATCH_{field.upper()}": field for field in Settings.model_fields}
    cli = _cli_envvars()
    assert {"PROMPTBATCH_ROLE", "PROMPTBATCH_PORT"} <= cli  # the health command's
    secrets = set(_compose()["secrets"])
    for name, svc in _promptbatch_services().items():
        mounted = set(svc["secrets"])
        assert mounted <= secrets, (name, mounted - secrets)
        values: dict[str, str] = {}
        for key, value in svc["environment"].items():
            assert key.startswith("PROMPTBATCH_"), (name, key)
            if key.endswith("_FILE"):  # a Docker secret: a setting read from a file
                assert key.removesuffix("_FILE") in settings, f"{name}: {key} is no setting"
                assert value.startswith("/run/secrets/"), (name, key, value)
                assert value.removeprefix("/run/secrets/") in mounted, \
                    f"{name}: {key} names a secret the service does not mount"
            elif key in settings:
                values[settings[key]] = str(value)
            else:
                assert key in cli, f"{name}: {key} is neither a setting nor read by a command"
        Settings.model_validate(values)  # each value is valid


def _created_secret_files() -> set[str]:
    """The files of secrets/ that the header's steps write."""
    return set(re.findall(r"> secrets/(\w+)", _header()))


def test_the_header_creates_every_secret_file_compose_needs() -> None:
    compose = _compose()
    files = {s["file"].removeprefix("./secrets/") for s in compose["secrets"].values()}
    assert all(s["file"].startswith("./secrets/") for s in compose["secrets"].values())
    assert files == _created_secret_files()
    used = {name for svc in compose["services"].values() for name in svc.get("secrets", [])}
    assert used == set(compose["secrets"]), "a secret is defined and never used"


def test_the_sentinel_profile_matches_the_address_the_header_gives() -> None:
    from config.redisaddr import SentinelAddress
    from config.settings import Settings

    services = _compose()["services"]
    in_profile = {n for n, s in services.items() if "sentinel" in s.get("profiles", [])}
    assert in_profile == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    url = re.search(r'"(redis\+sentinel://[^"]+)"', _header())
    assert url, "the header gives no Sentinel address"
    address = SentinelAddress.parse(url.group(1).replace("$(cat secrets/redis_password)", "pw"))
    for host, port in address.sentinels:
        config = services[host]["command"][2]
        assert host in in_profile and f"port {port}\\n" in config, (host, port)
        monitor = re.search(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", config)
        assert monitor, config
        assert monitor.group(1) == address.master  # the name the services ask for
        assert monitor.group(2) == "redis" and monitor.group(3) == "6379"
        assert int(monitor.group(4)) == len(address.sentinels) // 2 + 1  # a quorum
    assert "--replicaof redis 6379" in services["redis-replica"]["command"][2]
    Settings.model_validate({"redis_url": address.url()})
    assert "COMPOSE_PROFILES=sentinel docker compose up -d" in _header()


def test_the_rabbitmq_profile_matches_the_broker_url_the_header_gives() -> None:
    from config.settings import Settings

    services = _compose()["services"]
    in_profile = {n for n, s in services.items() if "rabbitmq" in s.get("profiles", [])}
    assert in_profile == {"rabbitmq"}
    rabbit = services["rabbitmq"]
    url = re.search(r'"(amqp://[^"]+)"', _header())
    assert url, "the header gives no broker URL"
    parsed = urlsplit(url.group(1).replace("$(cat secrets/rabbitmq_password)", "pw"))
    assert parsed.hostname == "rabbitmq" and parsed.port == 5672
    assert parsed.username == rabbit["environment"]["RABBITMQ_DEFAULT_USER"]
    assert "rabbitmq_password" in rabbit["secrets"] and "healthcheck" in rabbit
    settings = Settings.model_validate({"broker_url": parsed.geturl()})
    assert settings.amqp
    assert "COMPOSE_PROFILES=rabbitmq docker compose up -d" in _header()
    for name, svc in _promptbatch_services().items():  # every role reads the broker URL
        if name != "migrate":
            assert svc["environment"]["PROMPTBATCH_BROKER_URL_FILE"] == "/run/secrets/broker_url"


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _stages() -> dict[str, str]:
    """Each stage's text by name."""
    parts = re.split(r"^FROM ", _dockerfile(), flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", p).group(1): p for p in parts}  # type: ignore[union-attr]


def test_the_dockerfile_builds_from_debian_slim_with_debians_python() -> None:
    text = _dockerfile()
    assert re.search(r"^ARG BASE=debian:bookworm-slim$", text, flags=re.M)
    stages = _stages()
    assert list(stages) == ["python", "build", "runtime"]
    assert stages["python"].startswith("${BASE} AS python")
    assert stages["build"].startswith("python AS build")
    assert stages["runtime"].startswith("python AS runtime")
    assert re.search(r"apt-get install -y --no-install-recommends\s+\\\s+python3 ",
                     stages["python"])
    # Binary wheels only: nothing is compiled, so no compiler anywhere.
    assert "--only-binary=:all:" in stages["build"]
    assert not re.search(r"\b(gcc|g\+\+|build-essential|python3-dev|clang)\b", text)


def test_the_runtime_stage_holds_the_virtual_environment_a_user_and_an_init() -> None:
    runtime = _stages()["runtime"]
    copies = re.findall(r"^COPY (.*)$", runtime, flags=re.M)
    assert copies == ["--from=build /opt/promptbatch /opt/promptbatch"]  # nothing else
    assert "apt-get" not in runtime
    user = re.findall(r"^USER (\S+)", runtime, flags=re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"\]$', runtime, flags=re.M)
    health = re.search(r'^HEALTHCHECK .*\n?.*CMD \["promptbatch", "health"\]', runtime,
                       flags=re.M)
    assert health, "no HEALTHCHECK running promptbatch health"
    assert "ENV PATH=/opt/promptbatch/bin:$PATH" in runtime
    cmd = re.search(r"^CMD (\[.*\])", runtime, flags=re.M)
    assert cmd
    words = yaml.safe_load(cmd.group(1))
    assert words[0] == "promptbatch"
    _parse(words[1:])


def test_the_build_context_and_the_image_digest_cover_exactly_what_the_image_copies() -> None:
    copied = {line.split()[0] for line in re.findall(r"^COPY (?!--from)(.*)$", _dockerfile(),
                                                      flags=re.M)}
    allowed = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    assert allowed[0] == "*"  # nothing enters the build context unless listed
    listed = {line[1:].rstrip("/") for line in allowed if line.startswith("!")}
    assert listed == copied
    script = (ROOT / "scripts" / "build-image.sh").read_text()
    inputs = re.search(r"^INPUTS=\((.*?)\)", script, flags=re.M | re.S)
    assert inputs
    assert set(inputs.group(1).split()) == copied | {"Dockerfile", ".dockerignore"}


#: Metrics that the alert rules and the dashboard may read before any code exports them
#: (none now: the anomalies' and the budgets' are exported). The labels are those the
#: rules use; once the code exports one, its own name and labels are what the checks below
#: compare against.
PENDING_METRICS: dict[str, frozenset[str]] = {}


def exported_metric_labels() -> dict[str, frozenset[str]]:
    """Every metric family the scheduler, the workers and the API export, with its label
    names (the cluster's counters with their optional ``tenant`` label)."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import producers.metrics
    import workers.metrics
    from jobs.budgets import Budget
    from jobs.stats import Count, Money
    from scheduler.metrics import SchedulerMetrics
    from scheduler.money import Snapshot

    sched = SchedulerMetrics(tenant_label=True)
    # The collectors that export only what they were given: one sample each.
    anomaly = ("latency_high", "openai", "gpt-4o", "10.0.0.6:8000/v1")
    sched.anomalies.update({anomaly: 1}, {anomaly})
    sched.money._snap = Snapshot(
        spent=[Money("t", "openai", "gpt-4o", "", 0.5)],
        saved=[Money("t", "", "", "exact_cache", 0.1)],
        budgets=[Budget("tenant", "t", 10.0, "month", 0.5, 0.0, None)])
    sched.cluster.update({"classes": [{"class": "normal", "pending": 1, "oldest_wait_s": 1.0,
                                       "inflight": 0, "slack_s": 3.0}],
                          "workers": 1, "slots": 2, "desired_slots": 1,
                          "cooling": ["openai|gpt-4o"],
                          "lanes": {"waiting": 1, "deployments": {"openai|gpt-4o": {
                              "open": 1, "jobs": 2, "oldest_s": 3.0}}}},
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


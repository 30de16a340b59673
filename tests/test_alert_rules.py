"""The Prometheus rules of deploy/prometheus: promtool accepts them and the configuration
that loads them, and their unit tests (deploy/prometheus/tests) pass: for every alert,
series that fire it and series that must not; for every recording rule, its values.

promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs it). Without it
the promtool tests skip, saying so, except in CI (``CI`` set), where they fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_files import PENDING_METRICS, exported_metric_labels

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULE_TESTS = sorted((RULES / "tests").glob("*.yml"))
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
#: Labels Prometheus adds to every scraped series.
SCRAPE_LABELS = frozenset({"instance", "job"})
#: Alerts without ``for:``: their expression already spans an hour.
NO_FOR = {"PromptbatchAnomalyFlapping"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if IN_CI:
            pytest.fail("promtool is missing: .ci/run installs it (apt-get install prometheus)")
        pytest.skip("promtool is not installed: apt-get install prometheus (Debian's package "
                    "carries it; the server need not run)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=RULES)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _alerts() -> dict[str, dict[str, Any]]:
    groups = _yaml(RULES / "alerts.yml")["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def _records() -> set[str]:
    return {r["record"] for g in _yaml(RULES / "recording.yml")["groups"] for r in g["rules"]}


def test_promtool_accepts_the_rules_and_the_configuration_that_loads_them() -> None:
    done = _run("check", "rules", "recording.yml", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = _run("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 rule files found" in done.stdout


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """The Grafana panels' and annotations' queries, with Grafana's interval variables
    filled in, parse (as the expressions of recording rules promtool checks)."""
    import json

    dashboard = json.loads((RULES.parent / "grafana" / "promptbatch.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    rules = [{"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "1m")}
             for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _run("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


@pytest.mark.parametrize("rule_test", RULE_TESTS, ids=lambda p: p.stem)
def test_the_promtool_unit_tests_pass(rule_test: Path) -> None:
    done = _run("test", "rules", str(rule_test.relative_to(RULES)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_unit_test_file_fixes_the_order_of_every_group() -> None:
    """Without ``group_eval_order`` promtool evaluates the groups of one step in an order
    that changes from run to run, so an alert would see this minute's recorded values in
    one run and the last minute's in the next."""
    groups = [g["name"] for name in ("recording.yml", "alerts.yml")
              for g in _yaml(RULES / name)["groups"]]
    for path in RULE_TESTS:
        order = _yaml(path).get("group_eval_order", [])
        assert sorted(order) == sorted(groups), path.name
        assert order[:2] == ["promptbatch-recording", "promptbatch-baselines"], path.name


def _alert_cases() -> tuple[set[str], set[str]]:
    """Alerts some test expects to fire, and alerts some test expects to stay quiet."""
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in _yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    return fired, quiet


def test_every_alert_has_series_that_fire_it_and_series_that_must_not() -> None:
    alerts = set(_alerts())
    fired, quiet = _alert_cases()
    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - quiet == set(), "alerts no test holds back"
    assert (fired | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_every_recording_rule_is_checked_by_value() -> None:
    exprs = " ".join(check["expr"] for path in RULE_TESTS for case in _yaml(path)["tests"]
                     for check in case.get("promql_expr_test", []))
    checked = set(re.findall(r"\b[a-z_]+:[a-z0-9_:]+", exprs))
    assert _records() - checked == set(), "recording rules no promql_expr_test reads"


def test_every_alert_says_how_bad_it_is_and_what_to_do() -> None:
    for name, rule in _alerts().items():
        assert name.startswith("Promptbatch"), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"], name
        assert "What to do:" in rule["annotations"]["description"], name
        assert ("for" in rule) == (name not in NO_FOR), name


def _series(selector: str) -> tuple[str, set[str]]:
    """``name{a="x",b="y"}`` as its name and label names."""
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?", selector.strip())
    assert match, selector
    labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"', match.group(2) or ""))
    return match.group(1), labels


def test_the_test_series_are_named_and_labelled_as_the_code_exports_them() -> None:
    """The unit tests feed the rules series as the scheduler, the workers and the API
    export them (plus Prometheus's own instance and job), so that rules that pass their
    tests also match the real series."""
    exported = exported_metric_labels()
    for path in RULE_TESTS:
        for case in _yaml(path)["tests"]:
            for series in case["input_series"]:
                name, labels = _series(series["series"])
                family = re.sub(r"_(total|bucket|sum|count)$", "", name)
                known = exported.get(family, PENDING_METRICS.get(family))
                assert known is not None, f"{path.name}: {name} is not a metric we export"
                extra = labels - known - SCRAPE_LABELS - ({"le"} if name.endswith("_bucket")
                                                           else set())
                assert extra == set(), f"{path.name}: {name} has labels it never has: {extra}"

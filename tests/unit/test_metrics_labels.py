"""Metric labels: tenants only when asked for, provider outcomes named as operators read
them, nothing exported by a standby."""

from __future__ import annotations

from jobs.stats import Count, label
from scheduler.metrics import SchedulerMetrics
from workers.metrics import outcome_of

OVERVIEW = {"classes": [{"class": "normal", "pending": 0, "oldest_wait_s": 0.0, "inflight": 0,
                         "slack_s": None}],
            "workers": 0, "slots": 0, "desired_slots": 0, "cooling": []}


def finished(metrics: SchedulerMetrics) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in metrics.registry.collect() if f.name == "promptbatch_jobs_finished"
            for s in f.samples}


def counts() -> list[Count]:
    return [Count("finished", "SUCCEEDED", "normal", "acme", "echo", "echo-1", 3),
            Count("finished", "SUCCEEDED", "normal", "globex", "echo", "echo-1", 4)]


def test_tenants_are_summed_unless_the_setting_asks_for_a_label() -> None:
    plain = SchedulerMetrics(tenant_label=False)
    plain.cluster.update(OVERVIEW, counts())
    assert list(finished(plain).values()) == [7]
    assert all("tenant" not in dict(k) for k in finished(plain))
    split = SchedulerMetrics(tenant_label=True)
    split.cluster.update(OVERVIEW, counts())
    assert sorted((dict(k)["tenant"], v) for k, v in finished(split).items()) == [
        ("acme", 3), ("globex", 4)]


def test_a_standby_exports_no_cluster_figures() -> None:
    m = SchedulerMetrics()
    m.cluster.update(None, counts())
    names = {f.name for f in m.registry.collect()}
    assert "promptbatch_jobs_finished" not in names and "promptbatch_jobs_pending" not in names
    assert "promptbatch_plan_duration_seconds" in names  # its own figures stay


def test_a_pipe_in_a_tenant_or_model_cannot_shift_the_labels() -> None:
    assert label("a|b", "openai", "ft:x|y") == "a/b|openai|ft:x/y"


def test_provider_outcomes() -> None:
    assert outcome_of(None, False) == "ok"
    assert outcome_of("HTTP 429: slow down", True) == "429"
    assert outcome_of("HTTP 503: unavailable", True) == "5xx"
    assert outcome_of("timed out (ReadTimeout)", True) == "timeout"
    assert outcome_of("the response was cut off or is not JSON (x): y", True) == "malformed"
    assert outcome_of("malformed response (KeyError): {}", False) == "malformed"
    assert outcome_of("context too long (HTTP 400): ...", False) == "error"

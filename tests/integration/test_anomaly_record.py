"""What the scheduler's monitor keeps in a real Redis and what reads it: the active and
recent anomalies (bounded), the raised counter, the ``avoid`` key of errors_high, the
baselines a new scheduler takes over (with the actions it applies again), the
``GET /v1/admin/anomalies`` route (admin keys only) and the status section. The
observations are synthetic, on a fake clock."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable

import httpx
import pytest
import redis
from rich.console import Console

from config import keys
from config.settings import Settings
from promptbatch.overview import read_overview, render
from scheduler.metrics import AnomalyView
from scheduler.monitor import Monitor
from scheduler.routing import Routing
from scheduler.scaling import DeadlineRisk
from tests.integration.test_api import Api

pytestmark = pytest.mark.integration

DEP = "openai|gpt-x"
A, B = "http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"


def configured(settings: Settings, **more: object) -> Settings:
    return settings.model_copy(update={
        "openai_base_url": f"{A},{B}",
        "fallbacks": {DEP: ["openai|gpt-spare"]}, **more})


def feed(monitor: Monitor, start: float, until: float, *, slow_b: bool = False,
         slow_a: bool = False, error_share: float = 0.0, seed: int = 3) -> float:
    """A batch on each replica every quarter second; ``step`` every second."""
    rng = random.Random(seed)
    t = start
    while t < until:
        t += 0.25
        for index in (0, 1):
            size = rng.choice((4, 8))
            slow = (slow_a, slow_b)[index]
            seconds = (0.05 + 0.01 * size) * rng.uniform(0.8, 1.2) * (5.0 if slow else 1.0)
            errors = sum(1 for _ in range(size) if rng.random() < error_share)
            fields = {"done": "b", "deployment": DEP, "size": str(size),
                      "seconds": str(seconds), "replica": str(index),
                      "completion_tokens": str(32 * size), "prompt_tokens": str(300 * size),
                      "cached_tokens": str(200 * size),
                      "calls": json.dumps([[DEP, index, size, errors]])}
            monitor.on_event(fields, t)
        if t % 1 == 0:
            monitor.step(t)
    return t


def only(monitor: Monitor, pred: Callable[[dict[str, object]], bool]) -> list[str]:
    return [a["id"] for a in monitor.snapshot() if pred(a)]


def test_errors_high_sets_avoid_while_active_and_the_record_is_kept_and_bounded(
        settings: Settings, r: redis.Redis) -> None:
    s = configured(settings, anomaly_recent_max=2)
    view = AnomalyView()
    monitor = Monitor(r, s, Routing(s), view)
    monitor.load(0.0)
    t = feed(monitor, 0.0, 120.0)
    assert r.hlen(keys.ANOMALIES) == 0 and not r.exists(keys.avoid(DEP))
    t = feed(monitor, t, 160.0, error_share=0.4)
    assert only(monitor, lambda a: a["kind"] == "errors_high" and a["replica"] == "")
    assert r.exists(keys.avoid(DEP)) and 0 < r.ttl(keys.avoid(DEP)) <= 15
    stored = {k: json.loads(v) for k, v in r.hgetall(keys.ANOMALIES).items()}
    assert "errors_high|error_ratio|openai|gpt-x|" in stored
    assert stored["errors_high|error_ratio|openai|gpt-x|"]["actions"] == [
        "fallbacks: new calls of openai|gpt-x go to openai|gpt-spare first"]
    assert r.hget(keys.ANOMALIES_RAISED, "errors_high|openai|gpt-x|") == "1"
    metrics = list(view.collect())
    gauge = {tuple(s.labels.values()): s.value for s in metrics[0].samples}
    assert gauge[("errors_high", "openai", "gpt-x", "")] == 1
    t = feed(monitor, t, 220.0)  # errors back to normal
    assert r.hlen(keys.ANOMALIES) == 0 and not r.exists(keys.avoid(DEP))
    cleared = [json.loads(x) for x in r.zrange(keys.ANOMALIES_RECENT, 0, -1)]
    assert {a["kind"] for a in cleared} == {"errors_high"}
    assert len(cleared) <= 2  # anomaly_recent_max
    gauge = {tuple(s.labels.values()): s.value
             for s in next(iter(view.collect())).samples}
    assert gauge[("errors_high", "openai", "gpt-x", "")] == 0  # the series stays, at 0
    # Turned off for the kind: raised and shown, nothing avoided.
    off = configured(settings, anomaly_actions_off=["errors_high"])
    quiet = Monitor(r, off, Routing(off))
    quiet.load(t)
    t = feed(quiet, t, t + 40.0, error_share=0.4, seed=8)
    assert only(quiet, lambda a: a["kind"] == "errors_high")
    assert not r.exists(keys.avoid(DEP))


def test_a_new_scheduler_takes_over_baselines_and_anomalies_with_their_actions(
        settings: Settings, r: redis.Redis) -> None:
    s = configured(settings)
    first = Monitor(r, s, Routing(s))
    first.load(0.0)
    t = feed(first, 0.0, 120.0)
    t = feed(first, t, 140.0, slow_b=True)
    assert only(first, lambda a: a["replica"] == "10.0.0.6:8000/v1")
    slowed = only(first, lambda a: True)
    t = feed(first, t, t + 11.0, slow_b=True)  # past SAVE_EVERY_S: baselines written
    assert r.hlen(keys.BASELINES) > 0
    r.hset(keys.BASELINES, "latency_per_token|openai|gone||3", json.dumps(
        {"level": 0.0, "spread": 0.1, "samples": 99, "blocks": 9, "at": t - 31 * 86400}))
    routing = Routing(s)
    second = Monitor(r, s, routing)
    second.load(t)
    # A baseline not taught for longer than retention_days is dropped; the rest are taken.
    assert not r.hexists(keys.BASELINES, "latency_per_token|openai|gone||3")
    assert r.hlen(keys.BASELINES) > 0
    assert {a["id"] for a in second.snapshot()} == set(slowed)
    assert [row["slowed"] for row in routing.snapshot()] == [False, True]
    # It judges at once from the stored baselines, and clears when B recovers.
    feed(second, t, t + 60.0, seed=5)
    assert second.snapshot() == []
    assert [row["slowed"] for row in routing.snapshot()] == [False, False]


def test_the_admin_route_and_the_status_section_show_the_anomalies(
        settings: Settings, r: redis.Redis) -> None:
    s = configured(settings)
    monitor = Monitor(r, s, Routing(s))
    monitor.load(0.0)
    t = feed(monitor, 0.0, 120.0)
    api = Api(settings, api_admin_keys={"admin-key": "ops"}).start()
    admin = httpx.Client(base_url=api.url, headers={"Authorization": "Bearer admin-key"})
    try:
        assert api.a.get("/v1/admin/anomalies").status_code == 403  # a tenant key
        body = admin.get("/v1/admin/anomalies", params={"baselines": "true"}).json()
        assert body["active"] == [] and body["recent"] == []
        assert any(b["signal"] == "latency_per_token" and b["replica"] == "10.0.0.5:8000/v1"
                   and b["samples"] >= 24 for b in body["baselines"])
        t = feed(monitor, t, t + 30.0, slow_a=True)
        body = admin.get("/v1/admin/anomalies").json()
        assert {(a["kind"], a["replica"]) for a in body["active"]} >= {
            ("latency_high", "10.0.0.5:8000/v1"), ("throughput_low", "10.0.0.5:8000/v1")}
        assert not any(a["replica"] == "10.0.0.6:8000/v1" for a in body["active"])
        assert all(a["id"] and a["expected"] < a["actual"] for a in body["active"]
                   if a["kind"] == "latency_high")
        assert "baselines" not in body
        assert admin.get("/v1/admin/anomalies", params={"recent": 0}).status_code == 422
    finally:
        admin.close()
        api.stop()
    r.set(keys.OVERVIEW, json.dumps({
        "at": t, "scheduler": "s", "classes": [], "workers": 1, "slots": 2,
        "inflight": 0, "desired_slots": 1, "scale_reason": "idle", "batch_seconds": 0.1,
        "cooling": [], "anomalies": monitor.snapshot()}))
    data = read_overview(r, t)
    assert data is not None
    console = Console(record=True, width=240, file=io.StringIO())
    console.print(render(data))
    text = console.export_text()
    assert "anomalies (against learned baselines)" in text
    assert "latency_high" in text and "openai|gpt-x@10.0.0.5:8000/v1" in text
    assert "probe batches (one at most every 3 s)" in text


def test_deadline_risk_raises_the_desired_slots_until_it_clears_unless_turned_off(
        settings: Settings, r: redis.Redis) -> None:
    risk = DeadlineRisk(cls=2, pressure=1.6, projected_s=48.0, slack_s=30.0, need=7)
    risks: list[DeadlineRisk | None] = [None, None, risk, None, None]
    for off, expected in (([], 9), (["deadline_risk"], 3)):
        s = settings.model_copy(update={"anomaly_actions_off": off})
        monitor = Monitor(r, s, Routing(s))
        monitor.load(0.0)
        for t in range(0, 5):
            monitor.on_deadlines(risks, float(t))
            monitor.step(float(t))
        assert only(monitor, lambda a: a["kind"] == "deadline_risk" and a["model"] == "normal")
        assert monitor.desired(3, "x", risks, cap=5)[0] == (5 if not off else 3)
        desired, reason = monitor.desired(3, "drain normal and above within 300 s", risks,
                                          cap=None)
        assert desired == expected  # 7 slots meet every deadline, plus 25%
        assert reason.startswith("deadline risk in normal") == (not off)
        # While it lasts the figure does not fall, though the backlog drains.
        less: list[DeadlineRisk | None] = [None, None, DeadlineRisk(2, 1.1, 33.0, 30.0, 2),
                                           None, None]
        assert monitor.desired(1, "x", less, cap=None)[0] == (9 if not off else 1)
        assert monitor.desired(1, "x", less, cap=None, keep_up=10.0)[0] == (
            15 if not off else 1)  # (2 + 10) x 1.25
        r.delete(keys.ANOMALIES, keys.ANOMALIES_RAISED)


def test_the_status_section_of_anomalies_reads_whole_at_80_columns(
        settings: Settings, r: redis.Redis) -> None:
    """``promptbatch status`` in an 80-column terminal: each anomaly's severity, where,
    figures and action are there whole (the table cut them to 'warni…', 'openai|gpt-…',
    and left the action out)."""
    s = configured(settings)
    monitor = Monitor(r, s, Routing(s))
    monitor.load(0.0)
    t = feed(monitor, 0.0, 120.0)
    t = feed(monitor, t, 160.0, error_share=0.4)
    t = feed(monitor, t, 220.0)  # errors_high cleared
    t = feed(monitor, t, 250.0, slow_a=True)  # latency_high on replica A, active
    shown = monitor.snapshot()
    assert {a["kind"] for a in shown} >= {"latency_high"}
    recent = [json.loads(x) for x in r.zrange(keys.ANOMALIES_RECENT, 0, -1)]
    assert {a["kind"] for a in recent} == {"errors_high"}
    r.set(keys.OVERVIEW, json.dumps({
        "at": t, "scheduler": "s", "classes": [], "workers": 1, "slots": 2,
        "inflight": 0, "desired_slots": 1, "scale_reason": "idle", "batch_seconds": 0.1,
        "cooling": [], "anomalies": shown, "recent_anomalies": recent}))
    data = read_overview(r, t)
    assert data is not None
    console = Console(record=True, width=80, file=io.StringIO())
    console.print(render(data))
    text = console.export_text()
    section = text[text.index("anomalies (against learned baselines)"):]
    assert "…" not in section
    words = " ".join(section.split())
    for a in shown + recent:
        where = DEP + (f"@{a['replica']}" if a["replica"] else "")
        assert f"{a['kind']} ({a['severity']}) on {where}: {a['signal']}" in words
    assert all(action in words for a in shown for action in a["actions"])
    assert "probe batches (one at most every 3 s)" in words
    assert all(a["cleared_why"] in words for a in recent)

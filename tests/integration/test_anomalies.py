"""Faults injected into real servers (OpenAI-compatible HTTP servers on loopback, a real
scheduler and worker): a replica that slows down five times is raised, loses its share
of batches and clears once it recovers; a deployment whose errors jump to 30% is raised
and its fallback takes the new calls before any cool-down; a backlog that cannot meet its
deadlines is raised, with a higher desired-workers figure, before the first miss. Steady
traffic with noise raises nothing meanwhile."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from rich.console import Console

from config import keys
from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from promptbatch.overview import read_overview, render
from tests.conftest import Procs
from tests.fake_llm import FakeLLM, FakeServer
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAMILIES = ("alpha", "bravo", "charlie", "delta")


def template(name: str) -> str:
    return f"You are the {name} desk's assistant. " + f"Follow the {name} handbook. " * 12


def wave(n: int, model: str = "gpt-test", per_family: int = 6) -> list[dict[str, Any]]:
    return [{"prompt": f"{template(f)}\n\nQuestion {n}-{i} for {f}: what now?",
             "provider": "openai", "model": model}
            for i in range(per_family) for f in FAMILIES]


def active(r: redis.Redis) -> dict[str, dict[str, Any]]:
    return {str(k): json.loads(v) for k, v in r.hgetall(keys.ANOMALIES).items()}


def recent(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(v) for v in r.zrange(keys.ANOMALIES_RECENT, 0, -1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


@contextmanager
def traffic(settings: Settings, model: str = "gpt-test", every: float = 0.3,
            ) -> Iterator[list[str]]:
    """Submits a wave of 24 jobs (4 prefix families) every ``every`` seconds, without
    waiting for them, until the block ends; yields the ids submitted so far."""
    ids: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with Client(settings) as client:
            n = 0
            while not stop.is_set():
                ids.extend(client.submit_many(wave(n, model)))
                n += 1
                stop.wait(every)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield ids
    finally:
        stop.set()
        thread.join(10)


def env_for(*fakes: FakeLLM, **extra: str) -> dict[str, str]:
    return {"PROMPTBATCH_OPENAI_BASE_URL": ",".join(f"{f.url}/v1" for f in fakes),
            "PROMPTBATCH_OPENAI_PREFIX_STRATEGY": "parallel",
            "PROMPTBATCH_MAX_BATCH_SIZE": "6", **extra}


@pytest.mark.timeout(300)
def test_a_replica_five_times_slower_is_raised_steered_around_and_cleared(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    noisy = {"delay_s": 0.1, "jitter": 0.3, "slow_share": 0.02}  # +-30%, 1 call in 50 slow
    with FakeServer(FakeLLM(**noisy)) as one, \
            FakeServer(FakeLLM(**noisy)) as two:  # type: ignore[arg-type]
        port = free_port()
        env = env_for(one, two)
        procs.scheduler(**env, PROMPTBATCH_METRICS_PORT=str(port))
        procs.worker(2, **env)
        slow_name = two.url.split("://", 1)[1] + "/v1"
        with traffic(settings):
            # Steady, noisy traffic: baselines are learned and nothing is raised (the
            # short real run of the steady scenario; the long one is a pure test).
            def learned() -> bool:
                return sum(1 for f in r.hkeys(keys.BASELINES)
                           if str(f).startswith(f"latency_per_token|openai|gpt-test|{slow_name}"
                                                "|")) > 0
            poll(learned, timeout=60, interval=0.5, what="the replica's baseline stored")
            steady_until = time.monotonic() + 10
            while time.monotonic() < steady_until:
                assert active(r) == {}, "a false alarm on steady traffic"
                time.sleep(0.5)
            assert r.hlen(keys.ANOMALIES_RAISED) == 0
            # The second replica slows to five times its latency.
            two.delay_s = 0.5
            slowed_at = time.monotonic()

            def raised() -> dict[str, Any] | None:
                return next((a for a in active(r).values()
                             if a["kind"] == "latency_high" and a["replica"] == slow_name), None)

            anomaly = poll(raised, timeout=45, interval=0.2, what="latency_high raised")
            detected_s = time.monotonic() - slowed_at
            assert detected_s <= 30, detected_s
            assert anomaly["provider"] == "openai" and anomaly["model"] == "gpt-test"
            assert anomaly["actual"] > 3 * anomaly["expected"]
            assert any("probe batches" in a for a in anomaly["actions"])
            assert all(a["replica"] == slow_name for a in active(r).values())
            # While it lasts, the slow replica gets under 20% of the batches.
            count_from = len(one.seen) + len(two.seen), len(two.seen)
            time.sleep(10)
            total = len(one.seen) + len(two.seen) - count_from[0]
            share = (len(two.seen) - count_from[1]) / total
            assert total > 50 and share < 0.2, (total, share)
            # What an operator sees: the status section and the metrics.
            data = read_overview(r, time.time())
            assert data is not None
            console = Console(record=True, width=200, file=io.StringIO())
            console.print(render(data))
            shown = console.export_text()
            assert "anomalies" in shown and "latency_high" in shown and slow_name in shown
            text = scrape(port)
            labels = (f'kind="latency_high",model="gpt-test",provider="openai",'
                      f'replica="{slow_name}"')
            assert f"promptbatch_anomaly_active{{{labels}}} 1.0" in text
            assert f"promptbatch_anomalies_raised_total{{{labels}}} 1.0" in text
            # It recovers: cleared within 60 s.
            two.delay_s = 0.1
            recovered_at = time.monotonic()
            poll(lambda: not any(a["kind"] == "latency_high" for a in active(r).values()),
                 timeout=75, interval=0.2, what="latency_high cleared")
            cleared_s = time.monotonic() - recovered_at
            assert cleared_s <= 60, cleared_s
        done = [a for a in recent(r) if a["kind"] == "latency_high"]
        assert done and done[0]["replica"] == slow_name and done[0]["cleared_at"]
        poll(lambda: f"promptbatch_anomaly_active{{{labels}}} 0.0" in scrape(port),
             timeout=10, what="the gauge back to 0")
        # Nothing on the healthy replica, ever.
        assert not any(a["replica"] == one.url.split("://", 1)[1] + "/v1"
                       for a in recent(r))


@pytest.mark.timeout(240)
def test_errors_jumping_to_30_percent_move_new_calls_to_the_fallback_before_a_cooldown(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    with FakeServer(FakeLLM(delay_s=0.05, error_model="gpt-test")) as fake:
        env = {"PROMPTBATCH_OPENAI_BASE_URL": f"{fake.url}/v1",
               "PROMPTBATCH_OPENAI_PREFIX_STRATEGY": "parallel",
               "PROMPTBATCH_MAX_BATCH_SIZE": "6",
               "PROMPTBATCH_PROVIDER_RETRY_BASE_S": "0.05",
               # A cool-down starts after failures in a row (3 by default): at 30% errors,
               # retries of single jobs fail three times running now and then (seen once in
               # five runs), which would move the calls too. The test measures the anomaly's
               # move alone, so a cool-down here takes a run of 10 (0.3**10: never seen).
               "PROMPTBATCH_COOLDOWN_FAILURES": "10",
               "PROMPTBATCH_FALLBACKS": json.dumps({"openai|gpt-test": ["openai|gpt-spare"]})}
        procs.scheduler(**env)
        procs.worker(2, **env)
        with traffic(settings) as ids:
            poll(lambda: any(str(f).startswith("error_ratio|openai|gpt-test||")
                             for f in r.hkeys(keys.BASELINES)),
                 timeout=60, interval=0.5, what="the deployment's error baseline stored")
            assert active(r) == {}
            fake.error_rate = 0.3
            broke_at = time.monotonic()

            def raised() -> dict[str, Any] | None:
                return next((a for a in active(r).values()
                             if a["kind"] == "errors_high" and a["replica"] == ""), None)

            anomaly = poll(raised, timeout=45, interval=0.2, what="errors_high raised")
            assert time.monotonic() - broke_at <= 30
            submitted_before = len(ids)
            assert (anomaly["provider"], anomaly["model"]) == ("openai", "gpt-test")
            assert 0.15 <= anomaly["actual"] <= 0.5
            assert any("gpt-spare" in a for a in anomaly["actions"])
            assert r.exists(keys.avoid("openai|gpt-test"))
            # New calls go to the fallback (the primary keeps a probe share), while no
            # cool-down ever started: the anomaly moved them first.
            before = len(fake.seen)
            time.sleep(6)
            models = [s.body.get("model") for s in fake.seen[before:]]
            spare = models.count("gpt-spare") / len(models)
            assert len(models) > 40 and spare >= 0.7, (len(models), spare)
            assert r.zcard(keys.COOLING) == 0 and not r.exists(keys.cooldown("openai|gpt-test"))
            submitted = list(ids)
        # Every job ends; those submitted once the fallback took over all succeed (before,
        # a job could fail four times in a row on the primary).
        with Client(settings) as client:
            states = {x.id: x.state for x in client.results(submitted, timeout=90)}
        assert len(states) == len(submitted)
        assert {states[i] for i in submitted[submitted_before:]} == {JobState.SUCCEEDED}


@pytest.mark.timeout(180)
def test_a_backlog_that_cannot_meet_its_deadlines_raises_deadline_risk_before_a_miss(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    env = {"PROMPTBATCH_MAX_BATCH_SIZE": "2"}
    procs.scheduler(**env)
    procs.worker(1, **env)  # one slot: a batch of two every half second
    with Client(settings) as client:
        # Teach the service time first (a batch takes 0.5 s).
        warm = client.submit_many([{"prompt": f"[echo:sleep=0.5] warm {i}"} for i in range(6)])
        assert {x.state for x in client.results(warm, timeout=60)} == {JobState.SUCCEEDED}
        # 120 jobs due 8 to 20 s from now: 60 batches, 30 s of the one slot: from about
        # the 40th on they cannot make it (the first would miss about 12 s from now).
        now = time.time()
        client.submit_many([{"prompt": f"[echo:sleep=0.5] job {i}", "priority": "normal",
                             "deadline": now + 8 + 0.1 * i} for i in range(120)])

        def at_risk() -> dict[str, Any] | None:
            return next((a for a in active(r).values() if a["kind"] == "deadline_risk"),
                        None)

        anomaly = poll(at_risk, timeout=20, interval=0.1, what="deadline_risk raised")
        missed = sum(int(v) for k, v in r.hgetall(keys.STATS).items()
                     if str(k).startswith("m|"))
        assert missed == 0  # raised before the first miss
        assert (anomaly["provider"], anomaly["model"], anomaly["replica"]) == (
            "", "normal", "")
        assert anomaly["actual"] > anomaly["expected"]  # projected past the slack
        data = read_overview(r, time.time())
        assert data is not None and data["slots"] == 1
        assert data["desired_slots"] >= 2, data["scale_reason"]  # more workers, asked for now
        assert any("scaling" in a for a in anomaly["actions"])
        missed = sum(int(v) for k, v in r.hgetall(keys.STATS).items()
                     if str(k).startswith("m|"))
        assert missed == 0  # still before the first miss

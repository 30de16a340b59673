"""Cache-aware routing over two OpenAI-compatible replicas on loopback (real HTTP servers,
a real scheduler and worker): a prefix family stays on one replica while both carry load;
a replica that dies is ejected and its batch goes to the other."""

from __future__ import annotations

import json

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from tests.conftest import Procs
from tests.fake_llm import FakeLLM, FakeServer
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAMILIES = ("alpha", "bravo", "charlie", "delta")


def template(name: str) -> str:
    """A system prompt of its own family (the first 256 characters differ)."""
    return (f"You are the {name} desk's assistant. " + f"Follow the {name} handbook. " * 12)


def jobs(wave: int, per_family: int = 6) -> list[dict[str, object]]:
    return [{"prompt": f"{template(f)}\n\nQuestion {wave}-{i} for {f}: what now?",
             "provider": "openai", "model": "gpt-test"}
            for i in range(per_family) for f in FAMILIES]


def families_seen(fake: FakeLLM) -> dict[str, int]:
    """How many requests of each family this replica answered."""
    out: dict[str, int] = {}
    for seen in fake.seen:
        for f in FAMILIES:
            if f"the {f} desk" in seen.text:
                out[f] = out.get(f, 0) + 1
    return out


def env_for(*fakes: FakeLLM, **extra: str) -> dict[str, str]:
    # Batches of one family each (6 jobs), so that each batch is routed on its own.
    return {"PROMPTBATCH_OPENAI_BASE_URL": ",".join(f"{f.url}/v1" for f in fakes),
            "PROMPTBATCH_OPENAI_PREFIX_STRATEGY": "parallel",
            "PROMPTBATCH_MAX_BATCH_SIZE": "6", **extra}


def test_each_family_stays_on_one_replica_while_both_carry_load(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    # Each call takes 0.3 s, so that a wave's four batches are in flight together even when
    # a loaded machine routes them over several ticks; and the idle rule (an idle replica
    # takes a batch from a busy holder: tests/unit/test_routing.py) is off, because a
    # replica that finished its share early is idle, not carrying load, and would rightly
    # take a family (seen once in five runs with instant calls).
    with FakeServer(FakeLLM(delay_s=0.3)) as one, FakeServer(FakeLLM(delay_s=0.3)) as two:
        env = env_for(one, two, PROMPTBATCH_ROUTING_IDLE_BATCHES="0")
        procs.scheduler(**env)
        procs.worker(2, **env)
        with Client(settings) as client:
            for wave in range(3):  # later waves find their family where the first left it
                ids = client.submit_many(jobs(wave))
                results = list(client.results(ids, timeout=60))
                assert {x.state for x in results} == {JobState.SUCCEEDED}
                # A wave's results come before its batches' ends reach the scheduler: the
                # next wave starts once the scheduler counts no work on either replica (on
                # a loaded machine, a replica still counted busy sends a family to the one
                # that looks idle, as the rule says it should).
                poll(lambda: _outstanding(r) in (0, None), timeout=30,
                     what="the scheduler to count the wave's batches done")
        a, b = families_seen(one), families_seen(two)
        assert a and b, (a, b)  # both replicas carried load
        assert not set(a) & set(b), f"a family was split over the replicas: {a} {b}"
        assert sum(a.values()) + sum(b.values()) == 3 * 6 * len(FAMILIES)


def test_a_replica_that_dies_is_ejected_and_its_batches_go_to_the_other(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    with FakeServer() as alive:
        dead = FakeServer()
        doomed = dead.state
        dead.thread.start()
        env = env_for(doomed, alive, PROMPTBATCH_COOLDOWN_FAILURES="1",
                      PROMPTBATCH_COOLDOWN_S="60")
        procs.scheduler(**env)
        procs.worker(2, **env)
        dead.__exit__()  # the first replica is gone before anything is sent
        with Client(settings) as client:
            ids = client.submit_many(jobs(0))
            results = list(client.results(ids, timeout=60))
            assert {r.state for r in results} == {JobState.SUCCEEDED}
            assert sum(families_seen(alive).values()) == len(ids)
            # Ejected: cooling down, as the scheduler shows it, and not tried again.
            name = keys.replica("openai|gpt-test", f"{doomed.url}/v1")
            poll(lambda: r.exists(keys.cooldown(name)), timeout=10, what="the cool-down")

            def cooling_in_overview() -> bool:
                data = json.loads(r.get(keys.OVERVIEW) or "{}")
                return any(row["cooling"] and row["replica"].endswith(doomed.url + "/v1")
                           for row in data.get("replicas", []))

            poll(cooling_in_overview, timeout=10, what="the overview to show it cooling")
            more = client.submit_many(jobs(1))
            assert {x.state for x in client.results(more, timeout=60)} == {JobState.SUCCEEDED}
        assert sum(families_seen(alive).values()) == len(ids) + len(more)


def _outstanding(r: redis.Redis) -> int | None:
    """Batches the scheduler counts on the replicas, as its overview shows them."""
    data = json.loads(r.get(keys.OVERVIEW) or "{}")
    rows = data.get("replicas")
    return None if not rows else sum(int(row["outstanding"]) for row in rows)


def test_a_batch_that_ends_without_a_timing_leaves_its_replica_at_once(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    # Each call outlasts the task's soft time limit (4 s, long enough for a loaded machine
    # to make the call): the batch ends by raising, its jobs fail, and no call's timing
    # comes back; the scheduler must still stop counting its work on the replica (it used
    # to wait for the visibility timeout, 360 s).
    with FakeServer(FakeLLM(delay_s=12.0)) as one, FakeServer(FakeLLM(delay_s=12.0)) as two:
        env = env_for(one, two, PROMPTBATCH_TASK_TIME_LIMIT_S="9")
        procs.scheduler(**env)
        procs.worker(2, **env)
        with Client(settings) as client:
            ids = client.submit_many(jobs(0, per_family=6)[:6])  # one family: one batch
            poll(lambda: _outstanding(r) == 1, timeout=30, what="the batch on a replica")
            results = list(client.results(ids, timeout=60))
            assert {x.state for x in results} == {JobState.FAILED}
            assert all("time limit" in (x.error or "") for x in results)
        assert len(one.seen) + len(two.seen) >= 1  # the call was made, and outlived the task
        poll(lambda: _outstanding(r) == 0, timeout=15,
             what="the scheduler to stop counting the batch on its replica")

"""Counts that balance: per deployment, the jobs counted as submitted equal the jobs
counted as finished plus the jobs still pending, at any quiet moment, whatever ended
them (run, expired in the scheduler, cancelled, coalesced, answered from the cache)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis

from config.settings import Settings
from jobs.models import JobState
from jobs.stats import read_totals
from producers.client import Client
from tests.conftest import Procs
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOYMENTS = (("echo", "echo-1"), ("simulated", "sim-1"))


def _balance(r: redis.Redis, client: Client, ids: list[str]) -> dict[str, tuple[int, ...]]:
    """Per deployment: (submitted, finished, pending in SQL)."""
    counts = read_totals(r)
    submitted: Counter[str] = Counter()
    finished: Counter[str] = Counter()
    for c in counts:
        if c.kind == "submitted":
            submitted[f"{c.provider}|{c.model}"] += c.value
        elif c.kind == "finished":
            finished[f"{c.provider}|{c.model}"] += c.value
    pending: Counter[str] = Counter()
    for stored in client.store.get_many(ids).values():
        if not stored.state.final:
            pending[f"{stored.spec.provider}|{stored.spec.model}"] += 1
    return {d: (submitted[d], finished[d], pending[d])
            for d in set(submitted) | set(finished) | set(pending)}


def test_submitted_equals_finished_plus_pending_per_deployment(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    env = {"PROMPTBATCH_SIMULATED_TIME_SCALE": "0"}
    procs.scheduler(**env)  # no worker yet: jobs wait, expire or are cancelled
    det: dict[str, Any] = {"params": {"temperature": 0}}
    with Client(settings) as client:
        ids: list[str] = []
        for provider, model in DEPLOYMENTS:
            ids += client.submit_many(
                [{"prompt": f"{provider} job {i}", "provider": provider, "model": model}
                 for i in range(20)]
                + [{"prompt": f"{provider} late {i}", "provider": provider, "model": model,
                    "timeout_s": 0.05} for i in range(5)]
                + [{"prompt": f"{provider} same", "provider": provider, "model": model,
                    **det} for _ in range(3)])  # one leads, two follow
        for job_id in ids[:3] + ids[28:31]:
            assert client.cancel(job_id) is JobState.CANCELLED
        expired = [i for i in ids if " late " in client.spec(i).text]
        poll(lambda: all(s.state is JobState.EXPIRED
                         for s in client.store.get_many(expired).values()),
             timeout=30, what="the late jobs to expire in the scheduler")
        quiet = _balance(r, client, ids)
        assert set(quiet) == {f"{p}|{m}" for p, m in DEPLOYMENTS}, quiet
        for deployment, (submitted, finished, pending) in quiet.items():
            assert submitted == finished + pending == 28, (deployment, quiet)
            assert finished == 8 and pending == 20  # 3 cancelled, 5 expired
        procs.worker(2, **env)
        assert len(list(client.results(ids, timeout=60))) == len(ids)
        for provider, model in DEPLOYMENTS:  # answered at submit, from the cache
            ids += client.submit_many([{"prompt": f"{provider} same", "provider": provider,
                                        "model": model, **det}])
        done = _balance(r, client, ids)
        for deployment, (submitted, finished, pending) in done.items():
            assert submitted == finished == 29 and pending == 0, (deployment, done)
        expired_results = client.queue.results(expired)
        assert {(x.provider, x.model) for x in expired_results if x} == set(DEPLOYMENTS)

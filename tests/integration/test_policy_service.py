"""The scheduler service keeps the policy's rules on a real server with real workers."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from tests.conftest import Procs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_mixed_workload_keeps_keys_apart_meets_deadlines_and_is_fair(
        settings: Settings, procs: Procs) -> None:
    procs.scheduler()  # the worker starts once everything waits, as a backlog would
    params_of: dict[str, str] = {}
    jobs = []
    for i in range(600):  # a big tenant's backlog, two parameter sets
        params = {"temperature": 0} if i % 2 else {"temperature": 0.7}
        jobs.append({"prompt": f"Summarise support ticket {i}: the app crashes on start",
                     "priority": "bulk", "tenant": "big", "params": params})
    for i in range(20):  # tight deadlines that cannot all be met, and easy ones
        jobs.append({"prompt": f"Answer now {i}", "priority": "high",
                     "timeout_s": 0.001 if i < 5 else 60, "tenant": "web"})
    small = {"prompt": "A single request of a small tenant", "priority": "bulk",
             "tenant": "small", "params": {"temperature": 0}}
    with Client(settings) as client:
        ids = client.submit_many(jobs)
        small_id = client.submit(**small)
        for job_id, job in zip(ids, jobs, strict=True):
            params_of[job_id] = json.dumps(job.get("params", {}), sort_keys=True)
        params_of[small_id] = json.dumps(small["params"], sort_keys=True)
        procs.worker(concurrency=2)
        done = {r.id: r for r in client.results([*ids, small_id], timeout=120)}
    assert len(done) == len(ids) + 1
    # One final state each; nothing ran after its deadline; what expired never ran.
    for job_id, job in zip(ids, jobs, strict=True):
        res = done[job_id]
        assert res.state in (JobState.SUCCEEDED, JobState.EXPIRED)
        if res.state is JobState.EXPIRED:
            assert res.started_at is None
        elif "timeout_s" in job:
            assert res.started_at is not None and res.created_at is not None
            assert res.started_at <= res.created_at + job["timeout_s"]
    assert all(done[j].state is JobState.EXPIRED for j in ids[600:605])
    # No batch mixes generation parameters.
    by_batch: dict[str, set[str]] = defaultdict(set)
    for job_id, res in done.items():
        if res.batch_id:
            by_batch[res.batch_id].add(params_of[job_id])
    assert by_batch and all(len(p) == 1 for p in by_batch.values())
    # Fairness: the small tenant's one job, last in, does not wait behind the big
    # tenant's backlog of the same class and key: about one batch of it goes first.
    ahead = sum(1 for j in ids[:600] if done[j].finished_at < done[small_id].finished_at
                and params_of[j] == params_of[small_id])
    assert ahead <= 2 * settings.max_batch_size, f"{ahead} of the big tenant's jobs went first"

"""Scenario 16: a scheduler started on a large backlog (as after an outage or a deploy)
keeps its lease, sends at once and drains every job."""

from __future__ import annotations

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.store import JobStore
from producers.client import Client
from tests.conftest import Procs
from tests.faults.test_faults import FAST
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults, pytest.mark.load]

JOBS = 100_000


@pytest.mark.timeout(900)
def test_16_a_scheduler_started_on_100000_pending_jobs_drains_them_all(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    classes = ["critical", "high", "normal", "low", "bulk"]
    with Client(settings) as client:  # submitted while no scheduler runs
        for start in range(0, JOBS, 10_000):
            client.submit_many({"prompt": f"backlog job {i}: tag this support ticket",
                                "priority": classes[i % 5] if i % 100 == 0 else "bulk",
                                "tenant": f"tenant-{i % 3}"}
                               for i in range(start, start + 10_000))
    assert r.xlen(keys.INTAKE) == JOBS
    procs.worker(concurrency=2, **FAST)
    # A short lease, so that a long step without renewal would cost it; the default
    # reconcile interval, as a deployment runs it.
    sched = procs.scheduler(PROMPTBATCH_LEASE_TTL_S="2")
    store = JobStore(settings.database_url)
    try:
        poll(lambda: store.count_by_state() == {"SUCCEEDED": JOBS}, timeout=600, interval=1,
             what="every backlog job to succeed")
    finally:
        store.close()
    log = procs.logs()
    assert "lost its lease" not in log and "lease lost" not in log, "the scheduler stood down"
    holder = r.get(keys.SCHEDULER_LEASE) or ""
    assert holder.split(":")[1:2] == [str(sched.pid)], "the first scheduler is not the one active"
    assert r.xlen(keys.INTAKE) == 0
    poll(lambda: r.zcard(keys.INFLIGHT) == 0, timeout=60, interval=0.5,
         what="no batch left in flight")

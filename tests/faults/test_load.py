"""Scenario 15: 100,000 jobs from several producer processes over minutes, workers
restarted during the load; every job ends once, and the scheduler's memory is flat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.store import JobStore
from tests.conftest import Procs, settings_env
from tests.faults.test_faults import FAST
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults, pytest.mark.load]

JOBS = 100_000
PRODUCERS = 4

PRODUCER = """
import sys, time
from config.settings import Settings
from producers.client import Client
n, rate, tag = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with Client(Settings()) as client:
    start = time.monotonic()
    for chunk in range(0, n, 500):
        client.submit_many({"prompt": f"{tag} job {i}: classify this support ticket",
                            "priority": ["high", "normal", "low", "bulk"][i % 4]}
                           for i in range(chunk, min(n, chunk + 500)))
        ahead = (chunk + 500) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
"""


@pytest.mark.timeout(900)
def test_15_load_with_worker_restarts(settings: Settings, procs: Procs,
                                      r: redis.Redis) -> None:
    sched = procs.scheduler(**FAST)
    workers = [procs.worker(concurrency=2, name=f"load{i}", **FAST) for i in range(2)]
    env = settings_env(settings)
    per = JOBS // PRODUCERS
    rate = per / 90.0  # the whole load over about a minute and a half
    producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(per), str(rate),
                                   f"p{i}"], env=env) for i in range(PRODUCERS)]
    store = JobStore(settings.database_url)
    rss: list[int] = []
    try:
        restarted = 0
        while any(p.poll() is None for p in producers):
            done = sum(n for s, n in store.count_by_state().items()
                       if s in ("SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED"))
            rss.append(psutil.Process(sched.pid).memory_info().rss)
            if restarted < len(workers) and done > (restarted + 1) * JOBS // 4:
                victim = workers[restarted]  # kill one worker, start a new one
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                procs.worker(concurrency=2, name=f"fresh{restarted}", **FAST)
                restarted += 1
            time.sleep(1)  # sampling the load, not waiting for a result
        assert all(p.returncode == 0 for p in producers)
        poll(lambda: sum(store.count_by_state().values()) == JOBS
             and set(store.count_by_state()) == {"SUCCEEDED"}, timeout=600, interval=1,
             what="every job to succeed")
        # Exactly one result each, in the result backend too.
        from sqlalchemy import select

        from jobs.store import JobRow

        with store.engine.connect() as conn:
            ids = [row[0] for row in conn.execute(select(JobRow.id))]
        assert len(ids) == JOBS
        # In the result backend too: a result that a killed worker stored only in SQL
        # gets there when its batch is delivered again (or the reconciler passes).
        poll(lambda: all(all(r.mget([keys.celery_result(i) for i in ids[start:start + 5000]]))
                         for start in range(0, JOBS, 5000)),
             timeout=150, interval=1, what="every result in the result backend")
        poll(lambda: r.zcard(keys.INFLIGHT) == 0, timeout=60, interval=0.5,
             what="no batch left in flight")
        assert r.xlen(keys.INTAKE) == 0
        after = psutil.Process(sched.pid).memory_info().rss
        early = rss[len(rss) // 4]
        # Bounded by the pending pool, not by the jobs seen: no growth after the load, and
        # no growth in proportion to the 100,000 jobs that went through.
        assert after <= max(rss) * 1.05, "the scheduler kept growing after the load"
        assert after <= early * 1.5 + 50_000_000, f"scheduler RSS {early} -> {after}"
        assert restarted == len(workers)
    finally:
        for p in producers:
            if p.poll() is None:
                p.kill()
        store.close()



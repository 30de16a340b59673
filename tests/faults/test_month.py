"""What weeks of running bring: a batch that waited long in the broker runs once; `up`
stops warm under load and refuses a second `up` on its data (real processes, signals and
servers)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from config import keys
from config.settings import Settings
from producers.client import Client
from tests.conftest import Procs
from tests.helpers import poll, provider_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

#: In flight for at most 16 + 15 s before the scheduler takes a batch for lost.
SHORT = {"PROMPTBATCH_VISIBILITY_TIMEOUT_S": "16", "PROMPTBATCH_TASK_TIME_LIMIT_S": "15",
         "PROMPTBATCH_RECONCILE_INTERVAL_S": "1", "PROMPTBATCH_RECONCILE_GRACE_S": "0",
         "PROMPTBATCH_LEASE_TTL_S": "2"}


def test_a_batch_that_waited_in_the_broker_and_runs_past_the_cutoff_runs_once(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    procs.scheduler(**SHORT)
    beating = threading.Event()
    beating.set()

    def heartbeat() -> None:  # a worker the scheduler counts, that consumes nothing
        while beating.is_set():
            r.hset(keys.WORKERS, "busy@elsewhere", json.dumps(
                {"concurrency": 4, "ts": time.time(), "pid": 0}))
            time.sleep(0.5)  # the heartbeat's own period, not a wait for work
        r.hdel(keys.WORKERS, "busy@elsewhere")

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        with Client(settings) as client:
            job = client.submit("[echo:sleep=9] slow to start, slow to run")
            member = poll(lambda: r.zrange(keys.INFLIGHT, 0, -1), timeout=30,
                          what="the batch to be claimed and sent")[0]
            claimed_at = float(r.zscore(keys.INFLIGHT, member) or 0)
            cutoff = claimed_at + 16 + 15
            # The batch waits in the broker until a worker comes, 22 s after its claim: it
            # starts before the cutoff and runs (9 s) past it.
            poll(lambda: time.time() >= claimed_at + 22, timeout=30, interval=0.1,
                 what="the batch to have waited")
            beating.clear()
            procs.worker(2, **SHORT)
            result = client.result(job, timeout=60)
            assert result.started_at is not None and result.started_at < cutoff
            assert result.finished_at > cutoff, "the batch did not run past the cutoff"
            # A reconciler pass that began after the cutoff has looked at the job.
            poll(lambda: float(r.hget(keys.RECONCILE, "started") or 0) > result.finished_at
                 and r.hget(keys.RECONCILE, "pass") is None, timeout=30, interval=0.1,
                 what="a reconciler pass after the batch")
        calls = provider_calls(settings.echo_call_log)
        assert calls[job] == 1, "the running batch was taken for lost and sent again"
    finally:
        beating.clear()
        thread.join(5)

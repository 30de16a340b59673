"""A job runs once: batches that wait or are delivered again are not taken for lost, the
scheduler's expiries and the reconciler's re-enqueues are fenced by its lease, the
reconciler's grace counts from the row's write, and followers of a gone leader run on
their own (real server, real SQLite file)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobResult, JobSpec, JobState, Priority
from jobs.queue import RedisQueue
from jobs.store import JobStore
from producers.client import Client
from scheduler.reconcile import LeaseLost, Reconciler, reconcile
from tests.helpers import poll

pytestmark = pytest.mark.integration


def _spec(created: float | None = None, prompt: str = "hi", **kw: object) -> JobSpec:
    return JobSpec(id=str(uuid.uuid4()), tenant="acme", priority=Priority.NORMAL,
                   created_at=time.time() if created is None else created, provider="echo",
                   model="echo-1", prompt=prompt, **kw)  # type: ignore[arg-type]


def test_a_batch_that_starts_late_refreshes_its_in_flight_entry(r: redis.Redis) -> None:
    q = RedisQueue(r)
    job = _spec()
    q.enqueue([job], ttl_s=600, max_pending=0)
    assert q.acquire_lease("me", 30)
    claimed_at = time.time() - 600  # claimed ten minutes ago, waited in the broker since
    assert q.claim("me", "late", "{}", [(job.id, job.tenant)], claimed_at, 2) == [job.id]
    assert q.start_run("late", "send-1", 0, 60, 2, time.time()) == 0  # it starts now
    # The scheduler drops entries older than (visibility timeout + time limit): not this one.
    reading = q.read_intake("0-0", 10, None, "0-0", stale_before=claimed_at + 1)
    assert reading.inflight == ["2:late"]
    # A second send of the batch that does not run leaves the entry as it is.
    assert q.start_run("late", "send-2", 0, 60, 2, time.time() + 100) is None
    assert r.zscore(keys.INFLIGHT, "2:late") < time.time() + 50  # type: ignore[operator]


def test_expiry_and_requeue_are_fenced_by_the_lease(settings: Settings, r: redis.Redis) -> None:
    q = RedisQueue(r)
    job = _spec()
    q.enqueue([job], ttl_s=600, max_pending=0)
    assert q.acquire_lease("successor", 30)
    assert q.take_to_expire("paused-leader", [(job.id, job.tenant)]) is None
    assert q.states([job.id]) == ["QUEUED"]  # untouched
    assert q.take_to_expire("successor", [(job.id, job.tenant)]) == [job.id]
    assert r.hget(keys.job(job.id), "state") == "SCHEDULED" and r.xlen(keys.INTAKE) == 0
    # A job of a lost batch goes back only for the lease's holder.
    assert q.requeue(job, str(r.hget(keys.job(job.id), "batch")), "paused-leader") is None
    assert q.requeue(job, str(r.hget(keys.job(job.id), "batch")), "successor") is True
    assert q.states([job.id]) == ["QUEUED"]


def test_a_paused_former_scheduler_neither_expires_nor_requeues(settings: Settings,
                                                               r: redis.Redis) -> None:
    from scheduler.service import Scheduler

    old = Scheduler(settings)
    try:
        with Client(settings) as client:
            due = client.submit("due now", timeout_s=0.01)
            lost = client.submit("in a lost batch")
        q = old.queue
        assert q.acquire_lease(old.token, 30)
        assert q.claim(old.token, "gone", "{}", [(lost, "default")], time.time() - 3600, 2)
        r.zrem(keys.INFLIGHT, "2:gone")  # its task was lost
        r.set(keys.SCHEDULER_LEASE, "the-successor")  # while this one was paused
        time.sleep(0.02)
        with pytest.raises(LeaseLost):
            old._expire_jobs([(due, "default")], time.time(), "deadline passed")
        with pytest.raises(LeaseLost):
            Reconciler(old.store, q, settings.model_copy(update={"reconcile_grace_s": 0.0}),
                       old.token).run_pass(time.time())
        assert q.states([due, lost]) == ["QUEUED", "SCHEDULED"]
        assert old.store.get(due).state is JobState.QUEUED  # type: ignore[union-attr]
    finally:
        old.store.close()


def test_the_reconcilers_grace_counts_from_when_the_row_was_written(settings: Settings,
                                                                    r: redis.Redis) -> None:
    store = JobStore(settings.database_url)
    queue = RedisQueue(r)
    # A submit_many that took a minute: its first job was created a minute before its
    # rows were written, and Redis does not hold it yet (the submit is still staging).
    slow = _spec(created=time.time() - 60)
    store.insert([slow])
    repairs = reconcile(store, queue, settings, time.time())
    assert repairs.reenqueued == 0 and queue.states([slow.id]) == [None]
    later = reconcile(store, queue, settings, time.time() + settings.reconcile_grace_s + 1)
    assert later.reenqueued == 1  # past the grace, counted from the write: repaired
    store.close()


@pytest.mark.parametrize("gone", ["withdrawn", "expired payload", "final without its result"])
def test_a_follower_whose_leader_is_gone_is_released_by_the_reconciler(
        settings: Settings, r: redis.Redis, gone: str) -> None:
    s = settings.model_copy(update={"reconcile_grace_s": 0.0})
    with Client(s) as client:
        leader, follower = (client.submit("Same?", params={"temperature": 0})
                            for _ in range(2))
        assert client.queue.states([leader, follower]) == ["QUEUED", "FOLLOWING"]
        spec = client.spec(leader)
        if gone == "withdrawn":
            client.queue.withdraw([spec])
        elif gone == "expired payload":  # it ended in SQL; its payload's time ran out
            client.store.finalize([JobResult(id=leader, state=JobState.EXPIRED)])
            r.delete(keys.job(leader))
        else:
            r.hset(keys.job(leader), "state", "SUCCEEDED")  # its write-back was lost
        repairs = reconcile(client.store, client.queue, s, time.time())
        assert repairs.requeued >= 1
        assert client.queue.states([follower]) == ["QUEUED"]  # it runs on its own


def test_a_scheduler_that_finds_another_server_sends_what_did_not_start_again(
        settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failover the scheduler's client rode through (it reconnects and retries on its
    own): the lease is renewed on another server, one that lacks a send the old one had."""
    from promptbatch.embedded import EmbeddedRedis, free_port
    from scheduler.service import Scheduler

    server = EmbeddedRedis(tmp_path / "own", port=free_port()).start()
    s = settings.model_copy(update={"redis_url": server.url, "lease_ttl_s": 0.3})
    sched = Scheduler(s)
    try:
        with Client(s) as client:
            job_id = client.submit("in a batch whose send is lost")
        r = redis.Redis.from_url(server.url, decode_responses=True)
        # A worker's heartbeat, so the scheduler has room to send (no worker takes it).
        r.hset(keys.WORKERS, "w@test", json.dumps({"concurrency": 1, "ts": time.time(),
                                                   "pid": 0}))
        assert sched._hold_lease()
        poll(lambda: (sched.tick(), sum(r.llen(q) for q in keys.QUEUES))[1] > 0,
             what="the batch's send")
        assert RedisQueue(r).states([job_id]) == ["SCHEDULED"] and r.hlen(keys.OUTBOX) == 1
        r.delete(*keys.QUEUES)  # the send is lost with the old server
        server.stop()
        server = EmbeddedRedis(tmp_path / "own", port=server.port).start()
        caplog.set_level(logging.WARNING, "scheduler.service")
        poll(lambda: sched._hold_lease() and sum(r.llen(q) for q in keys.QUEUES) > 0,
             what="the batch sent again")
        assert "Redis is another server now" in caplog.text
        assert r.hlen(keys.OUTBOX) == 1  # until a send of it starts
    finally:
        sched.store.close()
        server.stop()

"""The whole pipeline on real parts: Redis-compatible server, Celery workers, SQLite."""

from __future__ import annotations

import os
import signal

import pytest
import redis
from celery.result import AsyncResult

from config import keys
from config.settings import Settings
from jobs.errors import JobCancelled
from jobs.models import JobState
from producers.client import Client
from tests.conftest import BOTH_STORES, Procs
from tests.helpers import poll, provider_calls
from workers.factory import create_app

pytestmark = pytest.mark.integration


@pytest.mark.slow
@BOTH_STORES
def test_thousand_echo_jobs_each_get_exactly_one_result(settings: Settings, procs: Procs,
                                                        r: redis.Redis) -> None:
    procs.scheduler()
    procs.worker(concurrency=2)
    r.config_resetstat()
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"Summarise ticket {i}: the printer is jammed"}
                                 for i in range(1000))
        results = list(client.results(ids, timeout=120))
    assert sorted(r.id for r in results) == sorted(ids)
    assert all(res.state is JobState.SUCCEEDED for res in results)
    by_id = {res.id: res for res in results}
    assert by_id[ids[7]].text == "echo: Summarise ticket 7: the printer is jammed"
    assert max(res.batch_size or 0 for res in results) > 1, "jobs were never batched"
    calls = provider_calls(settings.echo_call_log)
    assert set(calls) == set(ids)
    assert max(calls.values()) == 1, "a job reached the provider twice"
    # The SQL store is the durable record: every job final there too.
    stored = client.store.get_many(ids)
    assert {s.state for s in stored.values()} == {JobState.SUCCEEDED}
    # A batch task stores no result of its own: sending one subscribes to no result
    # channel (Celery's Redis backend does, for each task sent without ignore_result).
    assert r.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0) == 0


@BOTH_STORES
def test_async_result_of_a_job_id_works_for_any_celery_user(settings: Settings, procs: Procs,
                                                            ) -> None:
    procs.scheduler()
    procs.worker(concurrency=1)
    with Client(settings) as client:
        job_id = client.submit("What is 2 + 2?", priority="high")
        app = create_app(settings)
        value = AsyncResult(job_id, app=app).get(timeout=60, interval=0.05)
        app.close()
    assert value["id"] == job_id
    assert value["state"] == "SUCCEEDED"
    assert value["text"] == "echo: What is 2 + 2?"


@BOTH_STORES
def test_cancel_before_dispatch_ends_cancelled_without_a_provider_call(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    procs.scheduler()  # no worker yet: the scheduler holds the job
    with Client(settings) as client:
        job_id = client.submit("Draft a reply to the landlord")
        poll(lambda: client.status(job_id) is JobState.QUEUED, what="the job to be queued")
        assert client.cancel(job_id) is JobState.CANCELLED
        procs.worker(concurrency=1)
        marker = client.submit("a later job that must run")
        assert client.result(marker, timeout=60).state is JobState.SUCCEEDED
        res = client.result(job_id, timeout=5)
        app = create_app(settings)
        with pytest.raises(JobCancelled):
            AsyncResult(job_id, app=app).get(timeout=5, interval=0.05)
        app.close()
    assert res.state is JobState.CANCELLED
    assert res.batch_id is None
    assert job_id not in provider_calls(settings.echo_call_log)
    assert client.status(job_id) is JobState.CANCELLED


def test_job_past_its_deadline_expires_without_a_provider_call(settings: Settings, procs: Procs,
                                                               r: redis.Redis) -> None:
    procs.scheduler()  # no worker: nothing can serve the job before its deadline
    with Client(settings) as client:
        job_id = client.submit("Summarise the meeting notes", timeout_s=0.5)
        res = client.result(job_id, timeout=30)
    assert res.state is JobState.EXPIRED
    assert res.finished_at <= res.created_at + 0.5 + 5.0, "expired long after its deadline"
    assert job_id not in provider_calls(settings.echo_call_log)


@pytest.mark.slow
def test_critical_job_behind_5000_bulk_jobs_finishes_before_them(settings: Settings,
                                                                 procs: Procs) -> None:
    procs.scheduler()
    procs.worker(concurrency=2)
    with Client(settings) as client:
        bulk = client.submit_many({"prompt": f"Classify product {i} into a category",
                                   "priority": "bulk"} for i in range(5000))
        critical = client.submit("Is the checkout page down?", priority="critical")
        done = {res.id: res for res in client.results([*bulk, critical], timeout=180)}
    crit = done[critical]
    assert crit.finished_at is not None and crit.created_at is not None
    ahead = sum(1 for j in bulk if crit.created_at < done[j].finished_at < crit.finished_at)
    # Of the bulk jobs still unfinished when the critical job arrived, at most those already
    # running or waiting in the broker (2 batches per pool process, max_batch_size each)
    # plus one tick's dispatch may finish before it.
    assert ahead <= 2 * 2 * settings.max_batch_size * 2, f"{ahead} bulk jobs finished first"
    assert done[critical].state is JobState.SUCCEEDED


@pytest.mark.slow
def test_scheduler_killed_mid_run_and_restarted_loses_nothing_and_sends_nothing_twice(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    procs.worker(concurrency=2)
    first = procs.scheduler()
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"Write a haiku about lighthouse number {i}",
                                  "priority": "low"} for i in range(3000))
        # Kill the scheduler while it is dispatching: some batches sent, some not.
        poll(lambda: r.zcard(keys.INFLIGHT) > 0 or r.hlen(keys.OUTBOX) > 0,
             timeout=30, what="the first batches to be sent")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        unfinished = sum(1 for x in client.queue.results(ids) if x is None)
        assert unfinished > 0, "the scheduler finished before it could be killed"
        procs.scheduler()
        results = list(client.results(ids, timeout=180))
    assert sorted(x.id for x in results) == sorted(ids)
    assert {x.state for x in results} == {JobState.SUCCEEDED}
    calls = provider_calls(settings.echo_call_log)
    assert set(calls) == set(ids)
    assert max(calls.values()) == 1, "a job reached the provider twice"


@pytest.mark.slow
def test_a_critical_job_with_a_deadline_passes_critical_jobs_without_one(
        settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    procs.worker(concurrency=1)
    with Client(settings) as client:
        # Sixteen critical calls of 1.5 s each, none with a deadline; they cannot share a
        # batch (different generation parameters). Then one with six seconds to live.
        client.submit_many({"prompt": f"[echo:sleep=1.5] slow question {i}",
                            "priority": "critical", "params": {"max_tokens": 100 + i}}
                           for i in range(16))
        due = client.submit("[echo:sleep=1.5] urgent question", priority="critical",
                            timeout_s=6)
        res = client.result(due, timeout=60)
    assert res.state is JobState.SUCCEEDED, res.error
    assert res.deadline is not None and res.finished_at <= res.deadline, "finished late"
    assert not res.missed_deadline

"""Bounded growth: what the job store keeps (retention) and how big the semantic index
may grow, on a real SQLite file and a real server."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from config import keys
from config.settings import Settings
from jobs.models import JobRequest, JobResult, JobSpec, JobState, Priority
from jobs.retention import PAGE, purge_older_than, purge_page
from jobs.store import JobStore
from producers.accounts import Accounts
from producers.client import Client
from tests.conftest import Procs, settings_env
from tests.helpers import poll

pytestmark = pytest.mark.integration

DAY = 86400.0


def _spec(created: float, idem: str | None = None, tenant: str = "acme") -> JobSpec:
    return JobSpec(id=str(uuid.uuid4()), tenant=tenant, priority=Priority.NORMAL,
                   created_at=created, provider="echo", model="echo-1", prompt="hi",
                   idempotency_key=idem)


def _aged_store(settings: Settings, now: float) -> tuple[JobStore, dict[str, list[str]]]:
    """A store with final jobs 40 and 10 days old, an unfinished job 40 days old, and
    Batch API records and files of both ages."""
    store = JobStore(settings.database_url)
    ids: dict[str, list[str]] = {"old": [], "recent": [], "open": []}
    for age, kind in ((40, "old"), (10, "recent")):
        specs = [_spec(now - age * DAY, idem=f"{kind}-{i}") for i in range(3)]
        store.insert(specs)
        store.finalize([JobResult(id=s.id, state=JobState.SUCCEEDED, text="x",
                                  finished_at=now - age * DAY) for s in specs])
        ids[kind] = [s.id for s in specs]
    unfinished = _spec(now - 40 * DAY)
    store.insert([unfinished])
    ids["open"] = [unfinished.id]
    accounts = Accounts(store)
    for age, status in ((40, "completed"), (40, "in_progress"), (10, "completed")):
        accounts.put_batch(f"batch_{age}_{status}", "acme", {
            "created_at": now - age * DAY, "status": status,
            "expires_at": now + DAY if status == "in_progress" else now - age * DAY})
    for age in (40, 10):
        row = accounts.put_file(f"file-{age}", "acme", "batch", "in.jsonl", b"{}\n")
        with store.engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("UPDATE files SET created_at = :t WHERE id = :i"),
                         {"t": now - age * DAY, "i": row["id"]})
    return store, ids


def test_purge_deletes_final_jobs_records_and_files_past_retention_only(
        settings: Settings) -> None:
    now = time.time()
    store, ids = _aged_store(settings, now)
    try:
        done = purge_older_than(store, 30, now)
        assert (done.jobs, done.batches, done.files) == (3, 1, 1)
        left = store.get_many(ids["old"] + ids["recent"] + ids["open"])
        assert set(left) == set(ids["recent"] + ids["open"])  # the unfinished job stays
        accounts = Accounts(store)
        assert accounts.get_batch("batch_40_completed", "acme") is None
        assert accounts.get_batch("batch_40_in_progress", "acme") is not None  # window open
        assert accounts.get_batch("batch_10_completed", "acme") is not None
        assert accounts.get_file("file-40", "acme") is None
        assert accounts.get_file("file-10", "acme") is not None
        # The idempotency key of a deleted job is free again: a new job takes it.
        again = _spec(now, idem="old-0")
        assert store.insert([again]) == {again.id: again.id}
        assert not purge_older_than(store, 30, now)  # nothing left past the period
    finally:
        store.close()


def test_a_page_deletes_at_most_page_rows(settings: Settings) -> None:
    now = time.time()
    store = JobStore(settings.database_url)
    try:
        specs = [_spec(now - 40 * DAY) for _ in range(PAGE + 5)]
        store.insert(specs)
        store.finalize([JobResult(id=s.id, state=JobState.FAILED, error="x",
                                  finished_at=now - 40 * DAY) for s in specs])
        assert purge_page(store, now - 30 * DAY, now).jobs == PAGE
        assert purge_page(store, now - 30 * DAY, now).jobs == 5
        assert purge_page(store, now - 30 * DAY, now).jobs == 0
    finally:
        store.close()


def test_the_purge_command_says_what_it_deleted(settings: Settings) -> None:
    store, _ = _aged_store(settings, time.time())
    store.close()
    out = subprocess.run([sys.executable, "-m", "promptbatch", "purge", "--older-than", "30"],
                         env=settings_env(settings), capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ("deleted 3 jobs, 1 batch records and 1 files older than "
                                  "30 days")


@pytest.mark.slow
def test_the_active_scheduler_deletes_jobs_past_retention(settings: Settings,
                                                          procs: Procs) -> None:
    # A retention of about a second, looked at every half second.
    env = {"PROMPTBATCH_RETENTION_DAYS": str(1.0 / DAY), "PROMPTBATCH_RETENTION_INTERVAL_S":
           "0.5"}
    procs.scheduler(**env)
    procs.worker(1)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i}"} for i in range(50))
        assert len(list(client.results(ids, timeout=60))) == 50
        poll(lambda: not client.store.get_many(ids), timeout=30, interval=0.1,
             what="the scheduler to delete the finished jobs")


def test_the_semantic_index_keeps_within_its_bounds_oldest_first(settings: Settings) -> None:
    from jobs.queue import connect
    from jobs.validation import resolve
    from scheduler.embedders import create_embedder
    from scheduler.semantic import SemanticCache

    s = settings.model_copy(update={"cache_semantic_tenants": ["acme"],
                                    "cache_semantic_max_entries": 40})
    r = connect(s.redis_url)
    embedder = create_embedder("hashed", dim=s.embedding_dim)

    def spec(i: int) -> Any:
        return resolve(JobRequest(prompt=f"question number {i} about topic {i * 7}",
                                  tenant="acme", cache="semantic",
                                  params={"temperature": 0}),  # type: ignore[arg-type]
                       job_id=f"j{i}", now=1.0, settings=s)

    clock = [1000.0]
    cache = SemanticCache(r, s, embedder, clock=lambda: clock[0])
    for i in range(100):
        clock[0] += 1
        cache.lookup([spec(i)])
    assert len(cache) <= 40
    assert r.zcard(keys.CACHE_VECTOR_ORDER) == len(cache)
    stored = r.zrange(keys.CACHE_VECTOR_ORDER, 0, -1, withscores=True)
    assert min(at for _, at in stored) > 1000.0 + 100 - 40  # the oldest went first
    vectors = sum(r.hlen(keys.cache_vectors(p)) for p in
                  {m.split("\t")[0] for m, _ in stored})
    assert vectors == len(cache)
    # A byte bound: each vector costs its floats and its key.
    small = s.model_copy(update={"cache_semantic_max_bytes": 10 * cache.vector_bytes})
    bounded = SemanticCache(r, small, embedder, clock=lambda: clock[0])
    renewals = []
    assert bounded.load(lambda: renewals.append(1)) == 10
    assert renewals, "the reload renews the lease"
    assert r.zcard(keys.CACHE_VECTOR_ORDER) == 10
    # Past the cache's time, vectors leave at the next lookup.
    clock[0] += s.cache_ttl_s + 1
    bounded.lookup([spec(1000)])
    assert len(bounded) == 1 and r.zcard(keys.CACHE_VECTOR_ORDER) == 1
    r.close()


def test_a_reload_renews_the_lease_page_by_page(settings: Settings) -> None:
    from jobs.queue import connect
    from scheduler import semantic
    from scheduler.embedders import create_embedder
    from scheduler.semantic import SemanticCache, member

    s = settings.model_copy(update={"cache_semantic_tenants": ["acme"]})
    r = connect(s.redis_url)
    embedder = create_embedder("hashed", dim=s.embedding_dim)
    now = time.time()
    pipe = r.pipeline(transaction=False)
    vec = embedder.embed(["hello"])[0].astype("float32").tobytes()
    n = semantic.LOAD_PAGE * 3 + 1
    for i in range(n):
        pipe.hset(keys.cache_vectors("p"), f"k{i}", vec)
        pipe.zadd(keys.CACHE_VECTOR_ORDER, {member("p", f"k{i}"): now})
    pipe.execute()
    calls: list[int] = []
    assert SemanticCache(r, s, embedder).load(lambda: calls.append(1)) == n
    assert len(calls) == 4  # once per page
    r.close()

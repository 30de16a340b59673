"""Bounded growth: what the job store keeps (retention) and how big the semantic index
may grow, on a real SQLite file and a real server."""

from __future__ import annotations

import json
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
from tests.conftest import BOTH_STORES, Procs, settings_env
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
    _provider_batches(store, now)
    for age in (40, 10):
        row = accounts.put_file(f"file-{age}", "acme", "batch", "in.jsonl", b"{}\n")
        with store.engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("UPDATE files SET created_at = :t WHERE id = :i"),
                         {"t": now - age * DAY, "i": row["id"]})
    return store, ids


def _provider_batches(store: JobStore, now: float) -> None:
    """Records of provider batches: closed 35 days ago, closed 5 days ago (created 40 days
    ago), open (created 40 days ago), closed today."""
    from jobs.provider_batches import ProviderBatches

    lanes = ProviderBatches(store)
    for name, created, closed in (("closed-long-ago", 40, 35), ("closed-lately", 40, 5),
                                  ("open", 40, None), ("closed-today", 1, 0)):
        lanes.record(f"pb-{name}", "openai|gpt-4o-mini", [], now - created * DAY, now)
        if closed is not None:
            lanes.close(f"pb-{name}", now - closed * DAY)


def _provider_batch_ids(store: JobStore) -> set[str]:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return {str(i) for (i,) in conn.execute(text("SELECT id FROM provider_batches"))}


def test_purge_deletes_final_jobs_records_and_files_past_retention_only(
        settings: Settings) -> None:
    now = time.time()
    store, ids = _aged_store(settings, now)
    try:
        done = purge_older_than(store, 30, now)
        assert (done.jobs, done.batches, done.files, done.provider_batches) == (3, 1, 1, 1)
        # A provider batch closed past the period goes; one closed lately or open stays.
        assert _provider_batch_ids(store) == {"pb-closed-lately", "pb-open",
                                              "pb-closed-today"}
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
        assert purge_page(store, now - 30 * DAY).jobs == PAGE
        assert purge_page(store, now - 30 * DAY).jobs == 5
        assert purge_page(store, now - 30 * DAY).jobs == 0
    finally:
        store.close()


def test_the_purge_command_says_what_it_deleted(settings: Settings) -> None:
    store, _ = _aged_store(settings, time.time())
    store.close()
    out = subprocess.run([sys.executable, "-m", "promptbatch", "purge", "--older-than", "30"],
                         env=settings_env(settings), capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ("deleted 3 jobs, 1 batch records, 1 files and 1 provider "
                                  "batch records older than 30 days")


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


# --- what an open Batch API batch needs -------------------------------------------------

def _counts(store: JobStore) -> dict[str, int]:
    """Rows per table, counted in SQL."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return {name: int(conn.execute(text(f"SELECT COUNT(*) FROM {name}")).scalar_one())
                for name in ("jobs", "batches", "files")}


def _batch_of_three(client: Client, window: str) -> tuple[Any, dict[str, Any], bytes,
                                                          list[str]]:
    """A Batch API batch of three requests made from an uploaded file: its service, its
    record, its input and its job ids (in input order)."""
    from jobs.store import JobRow
    from producers.openai_batch import BatchService

    service = BatchService(client.settings, client, Accounts(client.store))
    content = "".join(json.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "echo-1", "messages": [{"role": "user", "content": f"q{i}"}]}})
        + "\n" for i in range(3)).encode()
    source = service.create_file("acme", "batch", "in.jsonl", content)
    record = service.create_batch("acme", source["id"], "/v1/chat/completions", window, None)
    with client.store.engine.connect() as conn:
        from sqlalchemy import select

        keyed = dict(conn.execute(select(JobRow.idempotency_key, JobRow.id).where(
            JobRow.idempotency_key.like(f"{record['id']}:%"))).all())
    return service, record, content, [keyed[f"{record['id']}:req-{i}"] for i in range(3)]


def _end(client: Client, job_ids: list[str], at: float) -> None:
    from jobs.outcomes import record_results

    record_results(client.store, client.queue,
                   [JobResult(id=j, state=JobState.SUCCEEDED, text=f"answer of {j}",
                              finished_at=at) for j in job_ids],
                   ["acme"] * len(job_ids), result_ttl_s=60)


@BOTH_STORES
def test_an_open_batch_keeps_its_files_and_jobs_past_the_period_until_it_is_final(
        settings: Settings) -> None:
    with Client(settings) as client:
        # A window of 2,000 h (83 days) under a retention of 30 days.
        service, record, content, jobs = _batch_of_three(client, "2000h")
        now = time.time()
        _end(client, jobs[:2], now)
        later = now + 40 * DAY  # every row is past the period; the batch is still open
        done = purge_older_than(client.store, 30, later)
        assert (done.jobs, done.batches, done.files) == (0, 0, 0)
        assert done.kept == 2 + 1 + 2  # two final jobs, the record, input and listing
        assert _counts(client.store) == {"jobs": 3, "batches": 1, "files": 2}
        _end(client, jobs[2:], now)
        final = service.get("acme", record["id"])
        assert final["status"] == "completed"
        assert final["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        out = service.file_content("acme", final["output_file_id"]).decode().splitlines()
        assert [(o["custom_id"], o["response"]["body"]["choices"][0]["message"]["content"])
                for o in map(json.loads, out)] == [
            (f"req-{i}", f"answer of {jobs[i]}") for i in range(3)]
        assert service.file_content("acme", record["input_file_id"]) == content
        # Final now: its rows age as any other, and go.
        done = purge_older_than(client.store, 30, later)
        assert (done.jobs, done.batches, done.files, done.kept) == (3, 1, 3, 0)
        assert _counts(client.store) == {"jobs": 0, "batches": 0, "files": 0}


def test_a_batch_nobody_asks_about_goes_whole_once_its_window_is_past_the_period(
        settings: Settings) -> None:
    with Client(settings) as client:
        _, record, _, jobs = _batch_of_three(client, "48h")
        _end(client, jobs, time.time())  # its record still says in_progress
        closed = float(record["expires_at"])
        assert not purge_older_than(client.store, 30, closed + 29 * DAY)
        assert _counts(client.store) == {"jobs": 3, "batches": 1, "files": 2}
        done = purge_older_than(client.store, 30, closed + 31 * DAY)
        assert (done.jobs, done.batches, done.files) == (3, 1, 2)
        assert _counts(client.store) == {"jobs": 0, "batches": 0, "files": 0}


@BOTH_STORES
def test_rows_kept_for_an_open_batch_never_hold_up_the_rows_after_them(
        settings: Settings) -> None:
    from jobs.retention import Retention

    now = time.time()
    store = JobStore(settings.database_url)
    try:
        batch_id = f"batch_{uuid.uuid4().hex}"
        Accounts(store).put_batch(batch_id, "acme", {
            "id": batch_id, "created_at": now, "status": "in_progress",
            "expires_at": now + 400 * DAY})
        held = [_spec(now - 50 * DAY, idem=f"{batch_id}:req-{i}") for i in range(PAGE + 5)]
        other = [_spec(now - 50 * DAY, idem=f"other-{i}") for i in range(5)]
        store.insert(held + other)
        store.finalize([JobResult(id=s.id, state=JobState.SUCCEEDED, text="x",
                                  finished_at=now - 45 * DAY) for s in held])
        store.finalize([JobResult(id=s.id, state=JobState.SUCCEEDED, text="x",
                                  finished_at=now - 44 * DAY) for s in other])
        # The scheduler's steps, one page each: the second goes on after the first's
        # page of kept rows, and the third ends the pass.
        retention = Retention(store, 30, interval_s=60)
        assert retention.step(now, budget_s=0).jobs == 0
        assert retention.step(now, budget_s=0).jobs == 5
        assert retention.next_at == 0.0
        retention.step(now, budget_s=0)
        assert retention.next_at == now + 60
        assert set(store.get_many([s.id for s in held + other])) == {s.id for s in held}
        # A whole pass (the purge command) likewise.
        late = [_spec(now - 50 * DAY, idem=f"late-{i}") for i in range(3)]
        store.insert(late)
        store.finalize([JobResult(id=s.id, state=JobState.FAILED, error="x",
                                  finished_at=now - 40 * DAY) for s in late])
        done = purge_older_than(store, 30, now)
        assert (done.jobs, done.kept) == (3, PAGE + 5)  # the record is recent
    finally:
        store.close()

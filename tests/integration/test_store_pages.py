"""The store's pages cost the same in a large table as in a small one: each is one range
of an index, never a scan of every row (a real SQLite file)."""

from __future__ import annotations

import re
import time
import uuid

from sqlalchemy.dialects import sqlite

from config.settings import Settings
from jobs.models import JobResult, JobSpec, JobState, Priority
from jobs.store import JobStore


def _plan(store: JobStore, stmt: object) -> str:
    sql = _sql(stmt)
    with store.engine.connect() as conn:
        return " | ".join(str(row[-1]) for row in
                          conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))


def test_the_reconcilers_results_pages_are_one_index_range(settings: Settings) -> None:
    store = JobStore(settings.database_url)
    captured: list[object] = []
    real = store.engine.connect

    def spy() -> object:
        conn = real()
        execute = conn.execute

        def record(stmt: object, *a: object, **k: object) -> object:
            captured.append(stmt)
            return execute(stmt, *a, **k)  # type: ignore[arg-type]

        conn.execute = record  # type: ignore[method-assign]
        return conn

    store.engine.connect = spy  # type: ignore[method-assign]
    now = time.time()
    specs = [JobSpec(id=str(uuid.uuid4()), tenant="t", priority=Priority.BULK, created_at=now,
                     provider="echo", model="echo-1", prompt="x") for _ in range(3)]
    store.insert(specs)
    store.finalize([JobResult(id=s.id, state=JobState.SUCCEEDED, finished_at=now + i)
                    for i, s in enumerate(specs)])
    captured.clear()
    first = store.finished_page(now, limit=2)
    rest = store.finished_page(now, after=(first[-1][2], first[-1][0]), limit=2)
    assert [r[0] for r in first + rest] == [s.id for s in specs]
    plan = _plan(store, captured[0])
    assert "ix_jobs_finished" in plan and "TEMP B-TREE" not in plan, plan
    store.engine.connect = real  # type: ignore[method-assign]
    store.close()


def _aged_rows(store: JobStore, now: float) -> None:
    """Rows of every kind retention decides about, all past a period of 30 days: final
    jobs of an open Batch API batch and of none, batch records open and final, files
    (an open batch's input and listing, another upload), and provider batches open and
    closed."""
    from jobs.provider_batches import ProviderBatches
    from producers.accounts import Accounts

    old = now - 40 * 86400
    accounts = Accounts(store)
    batches = {"open": f"batch_{uuid.uuid4().hex}", "done": f"batch_{uuid.uuid4().hex}"}
    for kind, batch_id in batches.items():
        source = accounts.put_file(f"file-in-{kind}", "t", "batch", "in.jsonl", b"{}\n")
        listing = accounts.put_file(f"file-jobs-{kind}", "t", "batch_jobs",
                                    f"{batch_id}_jobs.jsonl", b"[]\n")
        accounts.put_batch(batch_id, "t", {
            "id": batch_id, "created_at": old, "input_file_id": source["id"],
            "_jobs_file": listing["id"], "expires_at": now + 86400,
            "status": "in_progress" if kind == "open" else "completed"})
    accounts.put_file("file-other", "t", "batch", "other.jsonl", b"{}\n")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE files SET created_at = ?", (old,))
    specs = [JobSpec(id=str(uuid.uuid4()), tenant="t", priority=Priority.BULK,
                     created_at=old, provider="echo", model="echo-1", prompt="x",
                     idempotency_key=key)
             for key in (f"{batches['open']}:a", f"{batches['done']}:a", "own", None)]
    store.insert(specs)
    store.finalize([JobResult(id=s.id, state=JobState.SUCCEEDED, finished_at=old + i)
                    for i, s in enumerate(specs)])
    lanes = ProviderBatches(store)
    for name in ("open", "closed"):
        lanes.record(f"pb-{name}", "openai|gpt-4o-mini", [], old, now)
    lanes.close("pb-closed", old + 60)


def test_every_statement_of_retention_is_one_index_range_or_lookup(
        settings: Settings) -> None:
    from jobs.retention import Cursor, purge_page

    store = JobStore(settings.database_url)
    now = time.time()
    _aged_rows(store, now)
    captured: list[object] = []
    real = store.engine.begin

    class Spy:
        def __init__(self) -> None:
            self.ctx = real()

        def __enter__(self) -> object:
            conn = self.ctx.__enter__()
            execute = conn.execute

            def record(stmt: object, *a: object, **k: object) -> object:
                captured.append(stmt)
                return execute(stmt, *a, **k)  # type: ignore[arg-type]

            conn.execute = record  # type: ignore[method-assign]
            return conn

        def __exit__(self, *exc: object) -> None:
            self.ctx.__exit__(*exc)  # type: ignore[arg-type]

    store.engine.begin = Spy  # type: ignore[assignment,method-assign]
    cursor = Cursor()  # pages of one row: the first page's statements and the later ones'
    pages = [purge_page(store, now - 30 * 86400, cursor=cursor, limit=1)]
    while pages[-1].seen:
        pages.append(purge_page(store, now - 30 * 86400, cursor=cursor, limit=1))
    store.engine.begin = real  # type: ignore[method-assign]
    assert sum(p.jobs for p in pages) == 3 and sum(p.files for p in pages) == 3
    assert sum(p.batches for p in pages) == 1 and sum(p.provider_batches for p in pages) == 1
    assert sum(p.kept for p in pages) == 5
    plans = {_sql(stmt): _plan(store, stmt) for stmt in captured}
    kinds = {f"{sql.split()[0]} {m.group(1)}" for sql in plans
             if (m := re.search(r"\bFROM (\w+)", sql))}
    assert {"SELECT jobs", "DELETE jobs", "SELECT batches", "DELETE batches", "SELECT files",
            "DELETE files", "SELECT provider_batches", "DELETE provider_batches"} <= kinds, kinds
    for sql, plan in plans.items():
        assert "SEARCH" in plan and "SCAN" not in plan and "TEMP B-TREE" not in plan, \
            f"{sql}\n-> {plan}"
    store.close()


def _sql(stmt: object) -> str:
    return str(stmt.compile(dialect=sqlite.dialect(),  # type: ignore[attr-defined]
                            compile_kwargs={"literal_binds": True}))

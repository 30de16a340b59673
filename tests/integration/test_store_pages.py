"""The store's pages cost the same in a large table as in a small one: each is one range
of an index, never a scan of every row (a real SQLite file)."""

from __future__ import annotations

import time
import uuid

from sqlalchemy.dialects import sqlite

from config.settings import Settings
from jobs.models import JobResult, JobSpec, JobState, Priority
from jobs.store import JobStore


def _plan(store: JobStore, stmt: object) -> str:
    sql = str(stmt.compile(dialect=sqlite.dialect(),  # type: ignore[attr-defined]
                           compile_kwargs={"literal_binds": True}))
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


def test_retentions_pages_are_one_index_range(settings: Settings) -> None:
    from jobs.retention import purge_page

    store = JobStore(settings.database_url)
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
    purge_page(store, time.time(), time.time())
    store.engine.begin = real  # type: ignore[method-assign]
    plan = _plan(store, captured[0])
    assert "ix_jobs_finished" in plan and "TEMP B-TREE" not in plan, plan
    store.close()

"""Schema migrations when several processes start at once on a fresh store."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import pytest

from jobs.migrate import current_revision, head_revision
from jobs.store import JobStore, make_engine


def _start(url: str, barrier: Any, errors: Any) -> None:
    barrier.wait()  # line up with the other processes
    try:
        JobStore(url).migrate()
    except Exception:
        errors.put(traceback.format_exc()[-600:])
        raise


def test_processes_starting_together_on_a_fresh_store_all_migrate_it(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    failed = 0
    for round_ in range(6):  # each round: a fresh SQLite file, eight processes at once
        url = f"sqlite:///{tmp_path / f'round-{round_}' / 'jobs.db'}"
        barrier = ctx.Barrier(8)
        children = [ctx.Process(target=_start, args=(url, barrier, errors)) for _ in range(8)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
            failed += child.exitcode != 0
        engine = make_engine(url)
        assert current_revision(engine) is not None
        engine.dispose()
    assert failed == 0, f"{failed} of 48 starts failed:\n{errors.get(timeout=5)}"


def test_processes_starting_together_on_a_fresh_postgresql_store_all_migrate_it(
        pg_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    barrier = ctx.Barrier(8)
    children = [ctx.Process(target=_start, args=(pg_url, barrier, errors)) for _ in range(8)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    failed = sum(child.exitcode != 0 for child in children)
    assert failed == 0, f"{failed} of 8 starts failed:\n{errors.get(timeout=5)}"
    engine = make_engine(pg_url)
    assert current_revision(engine) is not None
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_batch_retention_migration_fills_in_the_input_files_of_stored_batches(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import json

    from alembic import command
    from sqlalchemy import text

    from jobs.migrate import alembic_config

    url = (str(request.getfixturevalue("pg_url")) if backend == "postgres"
           else f"sqlite:///{tmp_path / 'jobs.db'}")
    engine = make_engine(url)
    command.upgrade(alembic_config(engine), "0006")  # a store written before 0007
    records = {"batch_a": json.dumps({"input_file_id": "file-a"}), "batch_b": "not json",
               "batch_c": json.dumps({"input_file_id": None})}
    with engine.begin() as conn:
        for batch_id, data in records.items():
            conn.execute(text("INSERT INTO batches (id, tenant, created_at, data) "
                              "VALUES (:i, 't', 1.0, :d)"), {"i": batch_id, "d": data})
    JobStore(url).migrate()
    with engine.connect() as conn:
        found = dict(conn.execute(text("SELECT id, input_file_id FROM batches")).all())
    assert found == {"batch_a": "file-a", "batch_b": None, "batch_c": None}
    assert current_revision(engine) == head_revision(engine)
    engine.dispose()

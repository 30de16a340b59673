"""Schema migrations when several processes start at once on a fresh store."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

from jobs.migrate import current_revision
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

"""Idempotency keys and all-or-nothing submits, on a real server and a real store (a
SQLite file and a PostgreSQL database): a refused submit leaves no row that the
reconciler could later enqueue, whether it is refused for a key used twice in one call or
for a key a concurrent submit took first."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from sqlalchemy import text

from config import keys
from config.settings import Settings
from jobs.errors import IdempotencyConflict
from jobs.models import JobSpec
from jobs.store import JobStore
from producers.client import Client
from scheduler.reconcile import reconcile
from tests.conftest import BOTH_STORES

pytestmark = [pytest.mark.integration, BOTH_STORES]


def _rows(store: JobStore) -> list[tuple[str, str]]:
    """``(state, idempotency key or '')`` of every row of the jobs table, read in SQL."""
    with store.engine.connect() as conn:
        return sorted((str(s), k or "") for s, k in conn.execute(
            text("SELECT state, idempotency_key FROM jobs")))


def _reconciled(client: Client, settings: Settings) -> int:
    """Jobs a reconciler pass re-enqueues once the grace of every row is over (a row a
    refused submit left behind would be one)."""
    later = time.time() + settings.reconcile_grace_s + 1
    return reconcile(client.store, client.queue, settings, later).reenqueued


def test_a_key_used_twice_in_one_call_with_two_requests_writes_nothing(
        settings: Settings, r: redis.Redis) -> None:
    with Client(settings) as client:
        with pytest.raises(IdempotencyConflict) as err:
            client.submit_many([
                {"prompt": "charge card 42", "idempotency_key": "charge-42"},
                {"prompt": "a job of its own", "idempotency_key": "fresh"},
                {"prompt": "charge card 44", "idempotency_key": "charge-42"}])
        assert _rows(client.store) == []
        assert r.xlen(keys.INTAKE) == 0
        assert err.value.line == 3 and "line 1 of the same call" in str(err.value)
        assert _reconciled(client, settings) == 0
        assert r.xlen(keys.INTAKE) == 0 and _rows(client.store) == []


def test_a_key_used_twice_in_one_call_with_one_request_is_one_job(
        settings: Settings, r: redis.Redis) -> None:
    with Client(settings) as client:
        ids = client.submit_many([
            {"prompt": "charge card 42", "idempotency_key": "charge-42"},
            {"prompt": "a job of its own"},
            {"prompt": "charge card 42", "idempotency_key": "charge-42"}])
        assert ids[0] == ids[2] != ids[1]
        assert _rows(client.store) == [("QUEUED", ""), ("QUEUED", "charge-42")]
        assert r.xlen(keys.INTAKE) == 2


class _Racing:
    """Stores whose first read of the idempotency keys waits for the other's: both
    submits find the shared key free, then both write (the window a real race hits)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.barrier = threading.Barrier(2)

    def store(self) -> JobStore:
        store = JobStore.for_settings(self.settings)
        real = store._existing_idempotent
        reads = [0]

        def read(specs: Sequence[JobSpec]) -> Any:
            found = real(specs)
            reads[0] += 1
            if reads[0] == 1:
                self.barrier.wait(30)
            return found

        store._existing_idempotent = read  # type: ignore[method-assign]
        return store


def _race(settings: Settings, calls: list[list[dict[str, Any]]],
          ) -> list[list[str] | IdempotencyConflict]:
    racing = _Racing(settings)
    clients = [Client(settings, store=racing.store()) for _ in calls]

    def submit(n: int) -> list[str] | IdempotencyConflict:
        try:
            return clients[n].submit_many(calls[n])
        except IdempotencyConflict as exc:
            return exc

    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(submit, range(len(calls))))
    finally:
        for client in clients:
            client.close()


def test_two_submits_racing_on_one_key_with_two_requests_write_one_of_them_whole(
        settings: Settings, r: redis.Redis) -> None:
    outcomes = _race(settings, [
        [{"prompt": "only in the first", "idempotency_key": "first-own"},
         {"prompt": "charge card 42", "idempotency_key": "charge-42"}],
        [{"prompt": "only in the second", "idempotency_key": "second-own"},
         {"prompt": "charge card 44", "idempotency_key": "charge-42"}]])
    refused = [o for o in outcomes if isinstance(o, IdempotencyConflict)]
    won = [o for o in outcomes if isinstance(o, list)]
    assert len(refused) == 1 and len(won) == 1, outcomes
    winner = "first" if isinstance(outcomes[0], list) else "second"
    with Client(settings) as client:
        # The winner's two rows, none of the loser's (its own key was never written).
        assert _rows(client.store) == sorted([("QUEUED", f"{winner}-own"),
                                              ("QUEUED", "charge-42")])
        intake: list[Any] = r.xrange(keys.INTAKE)  # type: ignore[assignment]
        assert sorted(f["id"] for _, f in intake) == sorted(won[0])
        assert _reconciled(client, settings) == 0
        assert r.xlen(keys.INTAKE) == 2


def test_two_submits_racing_on_one_key_with_one_request_share_its_job(
        settings: Settings, r: redis.Redis) -> None:
    first, second = _race(settings, [
        [{"prompt": "only in the first", "idempotency_key": "first-own"},
         {"prompt": "charge card 42", "idempotency_key": "charge-42"}],
        [{"prompt": "only in the second", "idempotency_key": "second-own"},
         {"prompt": "charge card 42", "idempotency_key": "charge-42"}]])
    assert isinstance(first, list) and isinstance(second, list)
    assert first[1] == second[1] and first[0] != second[0]
    with Client(settings) as client:
        assert _rows(client.store) == [("QUEUED", "charge-42"), ("QUEUED", "first-own"),
                                       ("QUEUED", "second-own")]
        assert r.xlen(keys.INTAKE) == 3
        assert _reconciled(client, settings) == 0
        assert r.xlen(keys.INTAKE) == 3

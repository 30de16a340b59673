"""A batch's start counts as replicated only when a replica holds it: a real primary and
a real replica (the embedded binary on loopback); the replica is stopped with SIGSTOP
and the primary's script cache flushed (a new primary after a failover has no scripts),
so the start's script is loaded again and its ``WAIT`` must answer for it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobState
from jobs.queue import RedisQueue, connect
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis
from tests.helpers import poll
from workers.batch import BatchRunner
from workers.providers import create_provider

pytestmark = pytest.mark.integration

WAIT_MS = 400


@dataclass
class Pair:
    primary: EmbeddedRedis
    replica: EmbeddedRedis

    def stop_replica(self) -> None:
        assert self.replica.proc is not None
        os.kill(self.replica.proc.pid, signal.SIGSTOP)

    def resume_replica(self) -> None:
        assert self.replica.proc is not None
        os.kill(self.replica.proc.pid, signal.SIGCONT)


def _online(primary: redis.Redis) -> bool:
    info: Any = primary.info("replication")
    return any(k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
               for k, v in info.items())


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    primary = EmbeddedRedis(tmp_path / "primary",
                            extra_args=["--repl-diskless-sync-delay", "0"]).start()
    replica = EmbeddedRedis(tmp_path / "replica",
                            extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        replica.start()
        client = redis.Redis.from_url(primary.url)
        poll(lambda: _online(client), timeout=20, what="the replica in sync")
        client.close()
        yield Pair(primary, replica)
    finally:
        if replica.proc is not None and replica.proc.poll() is None:
            os.kill(replica.proc.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()


def _start(q: RedisQueue, batch: str, wait_ms: int = WAIT_MS,
           ) -> tuple[tuple[int | None, bool], float]:
    began = time.monotonic()
    got = q.start_run_replicated(batch, "send-1", 0, 60, 2, time.time(), replicas=1,
                                 wait_ms=wait_ms)
    return got, time.monotonic() - began


def test_a_start_whose_script_was_lost_is_not_reported_replicated_by_a_stopped_replica(
        pair: Pair) -> None:
    q = RedisQueue(connect(pair.primary.url))
    admin = redis.Redis.from_url(pair.primary.url)  # flushes from a connection of its own
    # With the replica running and the scripts lost, the reloaded start waits for it
    # (a "yes" comes as soon as the replica has it: a long wait costs nothing).
    admin.script_flush()
    (lost, held), _ = _start(q, "while-running", wait_ms=10_000)
    assert (lost, held) == (0, True)
    # The warm case: the replica stopped, the script known: "not replicated" after the wait.
    pair.stop_replica()
    (lost, held), took = _start(q, "warm")
    assert (lost, held) == (0, False) and took >= WAIT_MS / 1000 * 0.9
    # The scripts lost (a new primary has none), on a connection whose last write the
    # replica holds (its WAIT alone would answer "yes" at once): the same answer.
    pair.resume_replica()
    poll(lambda: admin.wait(1, 100) >= 1, timeout=20, what="the replica to catch up")
    q = RedisQueue(connect(pair.primary.url))
    assert q.r.set("written-before", "1") and q.r.wait(1, 5000) == 1
    pair.stop_replica()
    admin.script_flush()
    (lost, held), took = _start(q, "cold")
    assert lost == 0 and q.r.get(keys.batch_run("cold")) is not None  # the start ran
    assert held is False, "a start no replica holds was reported replicated"
    assert took >= WAIT_MS / 1000 * 0.9
    pair.resume_replica()
    replica = redis.Redis.from_url(pair.replica.url)
    poll(lambda: replica.get(keys.batch_run("cold")) is not None, timeout=20,
         what="the replica to catch up")
    replica.close()
    admin.close()


def _unreplicated() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("promptbatch_unreplicated_starts_total") or 0.0


def test_a_batch_started_on_a_primary_without_scripts_counts_as_unreplicated(
        pair: Pair, tmp_path: Path) -> None:
    settings = Settings(redis_url=pair.primary.url,
                        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                        data_dir=tmp_path / "var", redis_wait_replicas=1,
                        redis_wait_ms=WAIT_MS, _env_file=None)  # type: ignore[call-arg]
    store = JobStore(settings.database_url)
    store.migrate()
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i}"} for i in range(2))
        assert client.queue.acquire_lease("test-scheduler", 30)
        assert client.queue.claim("test-scheduler", "b1", "{}",
                                  [(i, settings.default_tenant) for i in ids], time.time(),
                                  2) == ids
        runner = BatchRunner(settings, client.queue, client.store,
                             lambda name: create_provider(name, settings))
        assert client.queue.r.wait(1, 5000) == 1  # the replica holds the claim
        pair.stop_replica()
        redis.Redis.from_url(pair.primary.url).script_flush()  # as a new primary has none
        before = _unreplicated()
        assert runner.run("b1", "send-1", ids)["succeeded"] == 2
        assert _unreplicated() - before == 1
        assert [s.state for s in client.store.get_many(ids).values()] == [JobState.SUCCEEDED] * 2
    store.close()

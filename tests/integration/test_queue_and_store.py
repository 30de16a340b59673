"""The Redis queue (Lua steps) and the SQL store, on a real server and a real SQLite file."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.errors import TenantQuotaExceeded
from jobs.models import JobResult, JobSpec, JobState, Priority
from jobs.outcomes import record_results
from jobs.queue import RedisQueue
from jobs.store import JobStore
from producers.client import Client
from tests.conftest import BOTH_STORES

pytestmark = pytest.mark.integration


def spec(tenant: str = "t", idem: str | None = None) -> JobSpec:
    return JobSpec(id=str(uuid.uuid4()), tenant=tenant, priority=Priority.NORMAL,
                   created_at=time.time(), provider="echo", model="echo-1", prompt="hi",
                   idempotency_key=idem)


def test_enqueue_writes_payload_and_intake_entry_together(r: redis.Redis) -> None:
    q = RedisQueue(r)
    s = spec()
    assert q.enqueue([s], ttl_s=60, max_pending=10) == [1]
    assert q.enqueue([s], ttl_s=60, max_pending=10) == [0]  # already there: nothing new
    job = r.hgetall(keys.job(s.id))
    assert job["state"] == "QUEUED" and JobSpec.model_validate_json(job["spec"]) == s
    assert r.xlen(keys.INTAKE) == 1
    assert 0 < r.ttl(keys.job(s.id)) <= 60


def test_claim_is_fenced_by_the_scheduler_lease(r: redis.Redis) -> None:
    q = RedisQueue(r)
    s = spec()
    q.enqueue([s], ttl_s=60, max_pending=10)
    assert q.acquire_lease("me", 5)
    assert not q.acquire_lease("someone-else", 5)
    now = time.time()
    assert q.claim("someone-else", "b0", "{}", [(s.id, s.tenant)], now, 2) is None
    assert q.claim("me", "b1", '{"cls": 2}', [(s.id, s.tenant)], now, 2) == [s.id]
    assert r.xlen(keys.INTAKE) == 0  # claimed: out of intake, the batch in the outbox
    assert q.claim("me", "b2", '{"cls": 2}', [(s.id, s.tenant)], now, 2) == []  # once only
    assert q.outbox() == {"b1": ('{"cls": 2}', [s.id])}
    # Counted in flight from the claim on, so a worker that finishes before the
    # scheduler confirms the send cannot leave a stale entry behind.
    assert r.zrange(keys.INFLIGHT, 0, -1) == ["2:b1"]
    # In the outbox until a send of it starts: a send lost with a Redis is sent again.
    assert q.start_run("b1", "send-1", 0, 60, 2, now) == 0
    assert q.outbox() == {} and r.xlen(keys.INTAKE) == 0
    q.batch_done("b1", 2)
    assert r.zcard(keys.INFLIGHT) == 0


def test_claim_and_start_run_each_step_once_on_a_server_that_forgot_its_scripts(
        r: redis.Redis) -> None:
    """After a restart the server has no scripts: each step must still run exactly once (a
    claim run twice would find its jobs SCHEDULED and send an empty batch, leaving them
    stuck)."""
    q = RedisQueue(r)
    first, second = spec(), spec()
    q.enqueue([first, second], ttl_s=60, max_pending=10)
    assert q.acquire_lease("me", 5)
    now = time.time()
    assert q.claim("me", "b1", '{"cls": 2}', [(first.id, first.tenant)], now, 2) == [first.id]
    r.script_flush()
    claimed = q.claim("me", "b2", '{"cls": 2}', [(second.id, second.tenant)], now, 2)
    assert claimed == [second.id]
    assert set(q.outbox()) == {"b1", "b2"}
    assert r.xlen(keys.INTAKE) == 0
    assert r.hget(keys.job(second.id), "state") == "SCHEDULED"
    r.script_flush()
    assert q.start_run("b1", "send-1", 0, 60, 2, now) == 0
    assert q.outbox() == {"b2": ('{"cls": 2}', [second.id])}  # b1 started
    reading = q.read_intake("0-0", 100, None, "0-0", stale_before=0.0)
    assert sorted(reading.inflight) == ["2:b1", "2:b2"]


@BOTH_STORES
def test_first_result_wins_in_sql_and_redis(settings: Settings, r: redis.Redis) -> None:
    store = JobStore(settings.database_url)
    store.migrate()
    q = RedisQueue(r)
    s = spec()
    store.insert([s])
    q.enqueue([s], ttl_s=60, max_pending=10)
    first = JobResult(id=s.id, state=JobState.SUCCEEDED, text="first")
    second = JobResult(id=s.id, state=JobState.FAILED, error="second")
    assert record_results(store, q, [first], [s.tenant], result_ttl_s=60) == {s.id}
    assert record_results(store, q, [second], [s.tenant], result_ttl_s=60) == set()
    stored = store.get(s.id)
    assert stored is not None and stored.state is JobState.SUCCEEDED
    assert stored.result is not None and stored.result.text == "first"
    assert q.results([s.id])[0].text == "first"  # type: ignore[union-attr]
    assert r.xlen(keys.INTAKE) == 0
    assert 0 < r.ttl(keys.celery_result(s.id)) <= 60


@BOTH_STORES
def test_idempotency_key_returns_the_same_job_and_writes_nothing_new(settings: Settings,
                                                                     r: redis.Redis) -> None:
    with Client(settings) as client:
        a = client.submit("Send the weekly report", idempotency_key="report-2026-48")
        b = client.submit("Send the weekly report", idempotency_key="report-2026-48")
        c = client.submit("Send the weekly report", idempotency_key="report-2026-48",
                          tenant="other")
    assert a == b != c
    assert r.xlen(keys.INTAKE) == 2


@BOTH_STORES
def test_tenant_over_its_pending_quota_is_refused_and_nothing_is_written(
        settings: Settings, r: redis.Redis) -> None:
    small = settings.model_copy(update={"max_pending_per_tenant": 3})
    with Client(small) as client:
        client.submit_many([{"prompt": f"p{i}", "tenant": "busy"} for i in range(3)])
        with pytest.raises(TenantQuotaExceeded, match="busy"):
            client.submit("one too many", tenant="busy")
        with pytest.raises(TenantQuotaExceeded):
            client.submit_many([{"prompt": "x", "tenant": "new"}] * 4)
        assert client.submit("another tenant is fine", tenant="calm")
        assert client.store.count_by_state() == {"QUEUED": 4}
    assert r.xlen(keys.INTAKE) == 4


def test_a_failed_redis_write_leaves_no_sql_row(settings: Settings, r: redis.Redis) -> None:
    with Client(settings) as client:
        r.config_set("maxmemory", "1")  # Redis refuses writes now (noeviction)
        try:
            with pytest.raises(Exception, match="try again"):
                client.submit("this must not be half written")
        finally:
            r.config_set("maxmemory", "0")
        assert client.store.count_by_state() == {}


@BOTH_STORES
def test_concurrent_finalizes_store_exactly_one_result_per_job(settings: Settings) -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    store = JobStore.for_settings(settings)
    specs = [spec() for _ in range(200)]
    store.insert(specs)

    def writer(n: int) -> list[str]:
        mine = [JobResult(id=s.id, state=JobState.SUCCEEDED, text=f"writer {n}")
                for s in specs]
        random.Random(n).shuffle(mine)  # each writer in its own order
        won: list[str] = []
        for start in range(0, len(mine), 25):
            won += store.finalize(mine[start:start + 25])
        return won

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(writer, range(8)))
    everyone = [job for won in wins for job in won]
    assert sorted(everyone) == sorted(s.id for s in specs), "a job won twice, or never"
    stored = store.get_many([s.id for s in specs])
    for n, won in enumerate(wins):
        assert all(stored[j].result is not None and stored[j].result.text == f"writer {n}"
                   for j in won)
    store.close()


def _mget_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats").get("cmdstat_mget", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


def test_waiting_results_come_through_the_stream_of_stored_ids(
        settings: Settings, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client waiting for results reads the ones the stream names, instead of reading
    # every pending result key over and over: counted at the server. The sweep of every
    # pending key is put off past the test, so results can only come through the stream.
    monkeypatch.setattr("producers.client._sweep_every", lambda pending: 3600.0)
    with Client(settings) as client:
        ids = client.submit_many([{"prompt": f"q{i}"} for i in range(50)])
        specs = {s.id: s for s in (client.spec(i) for i in ids)}

        def finish_later() -> None:  # two store steps, while the client waits
            for part in (ids[:20], ids[20:]):
                time.sleep(0.3)
                record_results(client.store, client.queue,
                               [JobResult(id=i, state=JobState.SUCCEEDED, text="a")
                                for i in part], [specs[i].tenant for i in part],
                               result_ttl_s=60)

        worker = threading.Thread(target=finish_later)
        r.config_resetstat()
        worker.start()
        got = list(client.results(ids, timeout=30))
        worker.join()
    assert sorted(g.id for g in got) == sorted(ids)
    # One read of every pending key at the start, then one per store step it names.
    assert _mget_calls(r) <= 3


def test_a_result_stored_without_a_stream_entry_is_found_by_the_sweep(
        settings: Settings, r: redis.Redis) -> None:
    from jobs.queue import celery_meta

    with Client(settings) as client:
        [job_id] = client.submit_many([{"prompt": "q"}])

        def write_later() -> None:  # as a result copied by hand, with no stream entry
            time.sleep(0.2)
            r.set(keys.celery_result(job_id),
                  celery_meta(JobResult(id=job_id, state=JobState.SUCCEEDED, text="a")))

        writer = threading.Thread(target=write_later)
        writer.start()
        [got] = list(client.results([job_id], timeout=10))  # else ResultTimeout
        writer.join()
    assert got.text == "a"


def test_results_that_left_redis_are_read_from_the_store_and_unknown_ids_refused(
        settings: Settings, r: redis.Redis) -> None:
    from jobs.errors import JobNotFound

    with Client(settings) as client:
        ids = client.submit_many([{"prompt": f"q{i}"} for i in range(3)])
        # Finished in SQL only, as after the result backend expired or lost the results.
        won = client.store.finalize([JobResult(id=i, state=JobState.SUCCEEDED, text=f"a{i}")
                                     for i in ids[:2]])
        assert sorted(won) == sorted(ids[:2])
        assert r.exists(*(keys.celery_result(i) for i in ids)) == 0
        got = {g.id: g.text for g in client.results(ids[:2], timeout=10)}
        assert got == {ids[0]: f"a{ids[0]}", ids[1]: f"a{ids[1]}"}
        with pytest.raises(JobNotFound) as err:
            list(client.results([ids[2], "no-such-job"], timeout=10))
        assert "no-such-job" in str(err.value)


@pytest.mark.parametrize("n", [3, 1_500])  # one step (staged and published), two stages
def test_a_submit_is_queued_in_intake_and_counted_once(settings: Settings, r: redis.Redis,
                                                      n: int) -> None:
    from jobs import stats

    with Client(settings) as client:
        ids = client.submit_many([{"prompt": f"q{i}", "priority": "low"} for i in range(n)])
        spec0 = client.spec(ids[0])
        assert r.xlen(keys.INTAKE) == n
        assert {r.hget(keys.job(i), "state") for i in ids} == {"QUEUED"}
        entries = r.xrange(keys.INTAKE, count=n)
        assert [fields["id"] for _, fields in entries] == ids  # in submit order
        assert [r.hget(keys.job(i), "sid") for i in ids] == [sid for sid, _ in entries]
        label = stats.label(spec0.tenant, spec0.provider, spec0.model)
        assert r.hget(keys.STATS, f"s|3|{label}") == str(n)
        assert r.scard(keys.tenant_pending(spec0.tenant)) == n
        # Two end while still in intake (cancelled): out of intake and of the tenant's quota.
        ended = [JobResult(id=i, state=JobState.CANCELLED) for i in ids[:2]]
        record_results(client.store, client.queue, ended, [spec0.tenant] * 2, result_ttl_s=60)
        assert r.xlen(keys.INTAKE) == n - 2
        assert r.scard(keys.tenant_pending(spec0.tenant)) == n - 2
        assert not r.sismember(keys.tenant_pending(spec0.tenant), ids[0])

"""The fault suite: real processes, real signals, a real Redis-compatible server.

Every test states its expectation and checks it from the SQL store (the durable record)
and the result backend: every accepted job ends in exactly one final state, with at
most one stored result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobSpec, JobState
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port
from tests.conftest import Procs
from tests.helpers import poll, provider_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

#: Short time limits so that redelivery happens within a test.
FAST = {"PROMPTBATCH_TASK_TIME_LIMIT_S": "15", "PROMPTBATCH_VISIBILITY_TIMEOUT_S": "20",
        "PROMPTBATCH_RECONCILE_INTERVAL_S": "2", "PROMPTBATCH_LEASE_TTL_S": "2"}


class OwnRedis:
    """A server the test can kill and restart on the same port and data folder."""

    def __init__(self, data: Path, appendonly: bool = True, start: bool = True) -> None:
        self.data = data
        self.port = free_port()
        self.appendonly = appendonly
        self.server = EmbeddedRedis(data, port=self.port, appendonly=appendonly)
        if start:
            self.server.start()

    @property
    def url(self) -> str:
        return self.server.url

    def kill(self) -> None:
        self.server.kill()

    def restart(self, wipe: bool = False) -> None:
        if wipe:
            for f in self.data.glob("**/*.aof*"):
                f.unlink()
            for d in self.data.glob("appendonlydir"):
                for f in d.iterdir():
                    f.unlink()
        self.server = EmbeddedRedis(self.data, port=self.port,
                                    appendonly=self.appendonly).start()


Own = tuple[OwnRedis, Settings, Procs]


@pytest.fixture
def make_own(tmp_path: Path, settings: Settings,
             request: pytest.FixtureRequest) -> Iterator[Callable[..., Own]]:
    """Make a server of the test's own (persistence and start as asked), with settings and
    processes pointing at it; all stopped at the end."""
    made: list[Own] = []

    def make(appendonly: bool = True, start: bool = True) -> Own:
        server = OwnRedis(tmp_path / f"own-redis-{len(made)}", appendonly, start)
        s = settings.model_copy(update={"redis_url": server.url})
        log_dir = tmp_path / f"own-logs-{len(made)}"
        log_dir.mkdir()
        made.append((server, s, Procs(s, log_dir)))
        return made[-1]

    yield make
    report = getattr(request.node, "rep_call", None)
    for server, _, procs in made:
        procs.stop_all()
        server.server.stop()
        if report is not None and report.failed:
            print(procs.logs())


@pytest.fixture
def own(make_own: Callable[..., Own]) -> Own:
    """A restartable AOF server of the test's own, with settings and processes."""
    return make_own()


def assert_exactly_one_final_result(client: Client, ids: list[str], r: redis.Redis,
                                    states: set[JobState] | None = None) -> None:
    results = {x.id: x for x in client.results(ids, timeout=120)}
    assert set(results) == set(ids)
    assert {x.state for x in results.values()} <= (states or {JobState.SUCCEEDED})
    stored = client.store.get_many(ids)
    assert all(s.state.final for s in stored.values())
    assert all(stored[i].state is results[i].state for i in ids), "SQL and Redis disagree"
    assert all(r.get(keys.celery_result(i)) for i in ids), "a result is missing in Redis"


def test_1_sigkill_of_a_pool_process_during_a_call(settings: Settings, procs: Procs,
                                                   r: redis.Redis) -> None:
    procs.scheduler(**FAST)
    worker = procs.worker(concurrency=2, **FAST)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"slow job {i} [echo:sleep=2]"} for i in range(6))
        poll(lambda: "RUNNING" in client.queue.states(ids), what="a provider call to start")
        children = psutil.Process(worker.pid).children(recursive=True)
        assert children, "no pool processes"
        for child in children:
            child.kill()
        assert_exactly_one_final_result(client, ids, r)


def test_2_sigkill_of_a_whole_worker_then_a_new_one(settings: Settings, procs: Procs,
                                                    r: redis.Redis) -> None:
    procs.scheduler(**FAST)
    first = procs.worker(concurrency=1, name="doomed", **FAST)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i} [echo:sleep=1]"} for i in range(4))
        poll(lambda: "RUNNING" in client.queue.states(ids), what="a batch to start")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        procs.worker(concurrency=1, name="rescuer", **FAST)
        assert_exactly_one_final_result(client, ids, r)


def test_4_sigterm_warm_shutdown_with_running_and_reserved_tasks(settings: Settings,
                                                                 procs: Procs,
                                                                 r: redis.Redis) -> None:
    procs.scheduler(**FAST)
    first = procs.worker(concurrency=2, name="leaving", **FAST)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i} [echo:sleep=1.5]", "priority": "low"}
                                 for i in range(80))
        poll(lambda: "RUNNING" in client.queue.states(ids), what="batches to start")
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(60)
        procs.worker(concurrency=2, name="arriving", **FAST)
        assert_exactly_one_final_result(client, ids, r)


def test_5_a_poison_job_fails_alone_after_killing_the_worker(settings: Settings, procs: Procs,
                                                             r: redis.Redis) -> None:
    procs.scheduler(**FAST)
    procs.worker(concurrency=1, **FAST)
    with Client(settings) as client:
        ids = client.submit_many([{"prompt": "innocent one"}, {"prompt": "poison [echo:crash]"},
                                  {"prompt": "innocent two"}])
        results = {x.id: x for x in client.results(ids, timeout=120)}
    assert results[ids[1]].state is JobState.FAILED
    assert results[ids[1]].error is not None and "killed the worker" in results[ids[1]].error
    assert results[ids[0]].state is results[ids[2]].state is JobState.SUCCEEDED


def test_6_a_call_longer_than_the_time_limit_fails_once_without_a_second_run(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    procs.scheduler(**FAST)
    procs.worker(concurrency=1, **FAST)
    with Client(settings) as client:
        job_id = client.submit("takes forever [echo:sleep=30]")
        res = client.result(job_id, timeout=60)
        assert res.state is JobState.FAILED and res.error is not None
        assert "time limit" in res.error
        # The call started once, was cut short by the time limit, and was not repeated.
        assert provider_calls(settings.echo_call_log)[job_id] == 1
        again = client.submit("after the slow one")
        assert client.result(again, timeout=30).state is JobState.SUCCEEDED


def test_8_two_schedulers_send_each_job_once(settings: Settings, procs: Procs,
                                             r: redis.Redis) -> None:
    procs.scheduler(**FAST)
    procs.scheduler(wait=False, **FAST)
    procs.worker(concurrency=2, **FAST)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i}"} for i in range(1500))
        assert_exactly_one_final_result(client, ids, r)
    calls = provider_calls(settings.echo_call_log)
    assert set(calls) == set(ids)
    assert max(calls.values()) == 1, "a job was sent twice"


def test_9_kill_9_redis_with_aof_restart_on_the_same_data(own: Own) -> None:
    server, s, procs = own
    procs.scheduler(**FAST)
    procs.worker(concurrency=2, **FAST)
    with Client(s) as client:
        ids = client.submit_many({"prompt": f"job {i} [echo:sleep=0.05]", "priority": "bulk"}
                                 for i in range(300))
        server.kill()
        t0 = time.monotonic()
        server.restart()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        # The AOF kept every accepted job: each is still known to the restarted server.
        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(keys.job(job_id), keys.celery_result(job_id))
        assert all(pipe.execute()), "the restarted server lost jobs it had acknowledged"
        client.r.connection_pool.disconnect()
        assert_exactly_one_final_result(client, ids, r)
        poll(lambda: r.hlen(keys.WORKERS) > 0, timeout=30, what="workers to report again")
        assert time.monotonic() - t0 < 120


def test_10_redis_without_persistence_loses_everything_the_reconciler_repairs(
        make_own: Callable[..., Own]) -> None:
    server, s, procs = make_own(appendonly=False)
    # No grace for new jobs: these were written to SQL long before Redis lost them.
    procs.scheduler(**FAST, PROMPTBATCH_RECONCILE_GRACE_S="0")
    with Client(s) as client:
        ids = client.submit_many({"prompt": f"job {i}"} for i in range(200))
        server.kill()
        server.restart(wipe=True)  # an empty server on the same port
        client.r.connection_pool.disconnect()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        assert r.xlen(keys.INTAKE) == 0
        procs.worker(concurrency=2, **FAST)
        assert_exactly_one_final_result(client, ids, r)


def test_11_redis_down_at_start_services_wait_then_start(
        make_own: Callable[..., Own]) -> None:
    server, s, procs = make_own(start=False)
    procs.scheduler(wait=False, **FAST)
    worker = procs.spawn("worker", "--concurrency", "1", "--loglevel", "warning", **FAST)
    assert worker.poll() is None  # waiting for Redis, not dead
    server.server.start()
    r = redis.Redis.from_url(server.url, decode_responses=True)
    poll(lambda: r.hlen(keys.WORKERS) > 0 and r.get(keys.SCHEDULER_LEASE), timeout=60,
         what="services to start once Redis is up")
    with Client(s) as client:
        ids = client.submit_many({"prompt": f"job {i}"} for i in range(20))
        assert_exactly_one_final_result(client, ids, r)


def test_13_redis_at_maxmemory_submit_answers_503(settings: Settings, r: redis.Redis) -> None:
    from tests.integration.test_api import Api

    api = Api(settings).start()
    try:
        assert api.a.post("/v1/jobs", json={"prompt": "fits"}).status_code == 201
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        resp = api.a.post("/v1/jobs", json={"prompt": "does not fit"})
        assert resp.status_code == 503 and "try again" in resp.json()["error"]["message"]
        r.config_set("maxmemory", "0")
        store = JobStore(settings.database_url)
        assert store.count_by_state() == {"QUEUED": 1}, "the refused job was half written"
        store.close()
    finally:
        api.stop()


def test_14_result_backend_unreachable_when_a_result_is_written(own: Own) -> None:
    server, s, procs = own
    procs.scheduler(**FAST)
    procs.worker(concurrency=1, **FAST)
    with Client(s) as client:
        job_id = client.submit("slow enough to lose Redis under it [echo:sleep=2]")
        poll(lambda: client.queue.states([job_id])[0] == "RUNNING", what="the call to start")
        server.kill()
        stored = poll(lambda: (x := client.store.get(job_id)) and x.state.final and x,
                      timeout=30, what="the result to reach SQL while Redis is down")
        assert stored.state is JobState.SUCCEEDED
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.queue.results([job_id])
        assert time.monotonic() - t0 < 15, "a client call hung"
        server.restart()
        client.r.connection_pool.disconnect()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        poll(lambda: r.get(keys.celery_result(job_id)), timeout=60,
             what="the result to reach the backend once it is back")
        assert client.result(job_id, timeout=5).state is JobState.SUCCEEDED


def test_the_readmes_reliability_section_names_real_settings_with_their_defaults() -> None:
    """Every setting the Reliability section names is a setting, and every default it
    states is the setting's default: the section cannot drift from the code unseen."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    fields = Settings.model_fields
    named = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", section))
    settings_like = {n for n in named if n.endswith(("_s", "_days", "_bytes", "_depth",
                                                     "_entries", "_deliveries"))}
    assert settings_like - set(fields) == set(), "named as settings but not settings"
    stated = re.findall(r"`([a-z_0-9]+)` \(([0-9][0-9,.]*)( MiB| s)?[;,)]", section)
    assert len(stated) >= 10, stated
    for name, value, unit in stated:
        number = float(value.replace(",", "")) * (1024 * 1024 if unit == " MiB" else 1)
        assert fields[name].default == number, (name, value, fields[name].default)



def test_3_kill_a_worker_holding_prefetched_tasks(settings: Settings, procs: Procs,
                                                  r: redis.Redis) -> None:
    procs.scheduler(**FAST)
    first = procs.worker(concurrency=2, name="hoarder", **FAST)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i} [echo:sleep=1]", "priority": "low"}
                                 for i in range(200))
        # Both pool processes busy and a batch reserved beside them: then kill it all.
        poll(lambda: r.hlen("unacked") >= 2, timeout=30, what="tasks to be reserved")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        procs.worker(concurrency=2, name="heir", **FAST)
        assert_exactly_one_final_result(client, ids, r)


def test_12_redis_frozen_for_30_seconds_then_thawed(own: Own) -> None:
    server, s, procs = own
    procs.scheduler(**FAST)
    procs.worker(concurrency=2, **FAST)
    with Client(s) as client:
        ids = client.submit_many({"prompt": f"job {i} [echo:sleep=0.2]", "priority": "low"}
                                 for i in range(300))
        poll(lambda: "RUNNING" in client.queue.states(ids), what="batches to run")
        assert server.server.proc is not None
        pid = server.server.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                client.queue.states(ids[:1])  # a client call fails, it does not hang
            assert time.monotonic() - t0 < 15
            time.sleep(30 - (time.monotonic() - t0))  # the fault itself: 30 s frozen
        finally:
            os.kill(pid, signal.SIGCONT)
        client.r.connection_pool.disconnect()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        assert_exactly_one_final_result(client, ids, r)


def test_17_redis_outages_during_a_batch_are_not_counted_as_poison(own: Own) -> None:
    server, s, procs = own
    procs.scheduler(**FAST)
    procs.worker(concurrency=1, **FAST)
    store = JobStore(s.database_url)
    #: Deliveries of the job's batch that Redis counted as following a lost worker, read
    #: while the batch lives (its record is deleted with its end).
    counted: list[int] = []
    with Client(s) as client:
        job_id = client.submit("outlives three outages [echo:sleep=1.5]")

        def read_deliveries() -> None:
            with contextlib.suppress(redis.RedisError):
                batch = client.r.hget(keys.job(job_id), "batch")
                found = client.r.hvals(keys.batch_deliveries(str(batch))) if batch else []
                if found:
                    counted.append(sum(int(n) - 1 for n in found))

        def call_or_end(k: int) -> bool:
            read_deliveries()
            return (provider_calls(s.echo_call_log)[job_id] >= k
                    or ((x := store.get(job_id)) is not None and x.state.final))

        outages = 0
        for k in range(1, 4):  # an outage during each provider call, up to three
            poll(lambda: call_or_end(k), timeout=90,  # noqa: B023
                 what=f"provider call {k} or the end of the job")
            stored = store.get(job_id)
            if stored is not None and stored.state.final:
                break
            server.kill()
            time.sleep(6)  # the fault itself: longer than the Redis client's own retries
            server.restart()
            outages += 1
        client.r.connection_pool.disconnect()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        poll(lambda: r.get(keys.celery_result(job_id)), timeout=60,
             what="the result to reach the result backend once Redis is back")
        assert_exactly_one_final_result(client, [job_id], r)
    store.close()
    assert outages >= 1
    assert provider_calls(s.echo_call_log)[job_id] == 1, "an outage made the call run again"
    assert counted and max(counted) == 0, f"a delivery was counted as lost: {counted}"
    # The worker logs each delivery it counts as following a lost worker: every line it
    # wrote, not the end of its log that procs.logs() keeps.
    worker_log = "".join(f.read_text(errors="replace")
                         for f in sorted(procs.log_dir.glob("worker-*.log")))
    assert "trying again" in worker_log  # the worker waited an outage out (its own log)
    assert "after its worker was lost" not in worker_log, "a delivery was counted as lost"


def test_18_redis_paused_in_the_middle_of_a_submit_leaves_no_phantom_job(own: Own) -> None:
    from sqlalchemy import select

    from jobs.errors import ServiceUnavailable
    from jobs.store import JobRow

    server, s, procs = own
    s = s.model_copy(update={"api_dependency_timeout_s": 1.0})
    procs.scheduler(**FAST, PROMPTBATCH_RECONCILE_GRACE_S="1")
    procs.worker(concurrency=1, **FAST)
    assert server.server.proc is not None
    pid = server.server.proc.pid
    client = Client(s, fail_fast=True)
    write_sql = client.store.insert

    def write_sql_then_freeze_redis(specs: list[JobSpec]) -> dict[str, str]:
        stored = write_sql(specs)
        os.kill(pid, signal.SIGSTOP)  # Redis stops answering between SQL and Redis
        return stored

    client.store.insert = write_sql_then_freeze_redis  # type: ignore[method-assign]
    try:
        with pytest.raises(ServiceUnavailable) as failed:
            client.submit_many({"prompt": f"caught mid-submit {i}"} for i in range(50))
        time.sleep(2)  # the fault itself: Redis paused a while longer
    finally:
        os.kill(pid, signal.SIGCONT)
        client.close()
    store = JobStore(s.database_url)
    with store.engine.connect() as conn:
        rows = {row[0] for row in conn.execute(select(JobRow.id))}
    # Either nothing was accepted, or what was is named by the error and ends final.
    assert rows == set(getattr(failed.value, "job_ids", [])), failed.value
    poll(lambda: all(x.state.final for x in store.get_many(sorted(rows)).values()),
         timeout=90, what="every accepted job to end in a final state")
    called = set(provider_calls(s.echo_call_log))
    assert called <= rows, f"{len(called - rows)} jobs ran that the store does not hold"
    r = redis.Redis.from_url(server.url, decode_responses=True)
    poll(lambda: all(r.get(keys.celery_result(i)) for i in rows), timeout=60,
         what="every result in the result backend")
    store.close()


def test_19_postgresql_restarted_under_load_the_api_answers_503_and_no_job_is_lost(
        settings: Settings, tmp_path: Path) -> None:
    import threading

    from tests.integration.test_api import Api
    from tests.pg import PostgresServer, create_database

    server = PostgresServer().start()
    try:
        url = create_database(server.admin_url)
        s = settings.model_copy(update={"database_url": url})
        JobStore(url).migrate()
        log_dir = tmp_path / "pg-logs"
        log_dir.mkdir()
        procs = Procs(s, log_dir)
        api = Api(s, max_pending_per_tenant=100_000).start()
        accepted: list[str] = []
        statuses: list[int] = []
        stop = threading.Event()

        def submit() -> None:
            n = 0
            while not stop.is_set():
                resp = api.a.post("/v1/jobs", json={"jobs": [
                    {"prompt": f"load {n}-{i} [echo:sleep=0.05]"} for i in range(20)]})
                statuses.append(resp.status_code)
                if resp.status_code == 201:
                    accepted.extend(resp.json()["ids"])
                n += 1

        try:
            procs.scheduler(**FAST)
            procs.worker(concurrency=2, **FAST)
            producer = threading.Thread(target=submit)
            producer.start()
            poll(lambda: len(accepted) >= 400, timeout=60, what="load before the restart")
            server.restart()  # sessions cut, a few seconds down
            poll(lambda: statuses[-20:].count(201) == 20 and 503 in statuses, timeout=90,
                 what="the API to answer 503 while PostgreSQL was down, then recover")
            stop.set()
            producer.join(30)
            store = JobStore(url)
            poll(lambda: all(x.state is JobState.SUCCEEDED
                             for x in store.get_many(accepted).values())
                 and len(store.get_many(accepted)) == len(accepted),
                 timeout=180, interval=1, what="every accepted job to succeed")
            store.close()
        finally:
            stop.set()
            api.stop()
            procs.stop_all()
    finally:
        server.stop()


def test_20_a_send_lost_with_its_redis_is_sent_again_when_another_server_answers(
        own: Own) -> None:
    """A failover can lose a batch's send (the replica had the claim, not the message in
    the broker queue). The scheduler that finds another server behind its address sends
    the batches that did not start again, long before their in-flight entry would go
    stale (visibility timeout + time limit: 660 s by default, left as they are here)."""
    server, s, procs = own
    quick = {"PROMPTBATCH_RECONCILE_INTERVAL_S": "2", "PROMPTBATCH_LEASE_TTL_S": "2"}
    procs.scheduler(**quick)
    procs.worker(concurrency=1, **quick)
    store = JobStore(s.database_url)
    with Client(s) as client:
        # One batch runs on the only pool process; the next waits in the broker queue.
        first = client.submit("keeps the worker busy [echo:sleep=4]")
        poll(lambda: client.queue.states([first]) == ["RUNNING"], what="the first batch")
        ids = client.submit_many({"prompt": f"then job {i}"} for i in range(3))
        r = redis.Redis.from_url(server.url, decode_responses=True)
        poll(lambda: sum(r.llen(q) for q in keys.QUEUES) > 0, timeout=30,
             what="the next batch to wait in the broker queue")
        assert set(client.queue.states(ids)) == {"SCHEDULED"}
        assert r.hlen(keys.OUTBOX) == 1  # sent and not started
        r.delete(*keys.QUEUES)  # the send is lost, as with a primary that died too soon
        server.server.stop()
        server.restart()  # another server (another run_id), with the claim and no send
        client.r.connection_pool.disconnect()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        every = [first, *ids]
        poll(lambda: all(j.state.final for j in store.get_many(every).values()), timeout=45,
             what="every job to end (the lost send sent again)")
        assert_exactly_one_final_result(client, every, r)
        assert r.hlen(keys.OUTBOX) == 0
    store.close()
    calls = provider_calls(s.echo_call_log)
    assert {j: calls[j] for j in every} == {j: 1 for j in every}

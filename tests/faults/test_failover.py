"""Losing the Redis primary under load, with Sentinel: a primary, a replica and three
sentinels from the embedded binary on loopback; the scheduler, two workers, the API and
the Python client find the primary through the sentinels; the primary is SIGKILLed after
about a third of 5,000 jobs have finished.

Checked where things happen: the SQL store's rows, the result backend's keys on the new
primary, the echo provider's own call log (calls per job), the API's status codes."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.errors import ServiceUnavailable
from jobs.models import FINAL_STATES, JobState
from jobs.queue import connect
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import SentinelGroup, free_port
from tests.conftest import Procs
from tests.helpers import poll, provider_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults, pytest.mark.load]

JOBS = 5000
#: Jobs per request (API) or per submit_many (Python client).
CHUNK = 25
#: The API's last chunks wait for the kill: sent while there is no primary, for certain.
HELD_CHUNKS = 10
#: Each batch's provider call lasts this long (the echo provider's test hook).
PROMPT = "[echo:sleep=0.3] failover {who} job {i}: say something short"
FINAL = {s.value for s in FINAL_STATES}


@pytest.mark.timeout(600)
def test_a_sentinel_failover_under_load_loses_no_job_and_runs_none_twice_but_the_running(
        tmp_path: Path) -> None:
    group = SentinelGroup(tmp_path / "redis", password="pw-failover").start()
    try:
        _run(group, tmp_path)
    finally:
        group.stop()


def _run(group: SentinelGroup, tmp_path: Path) -> None:
    settings = Settings(redis_url=group.url, database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                        data_dir=tmp_path / "var", echo_test_hooks=True,
                        echo_call_log=tmp_path / "echo-calls.jsonl",
                        _env_file=None)  # type: ignore[call-arg]
    assert settings.wait_replicas == 1
    store = JobStore(settings.database_url)
    store.migrate()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    procs = Procs(settings, log_dir)
    try:
        _under_load(group, settings, store, procs)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        store.close()


class Load:
    """The jobs submitted from the API and from the Python client, as they are accepted,
    with the API's status codes."""

    def __init__(self, settings: Settings, base: str) -> None:
        self.settings = settings
        self.base = base
        self.ids: list[str] = []
        self.lock = threading.Lock()
        self.statuses: list[tuple[float, int, str | None]] = []  # (time, status, Retry-After)
        self.errors: list[str] = []
        #: Set when the primary is killed: the API's last chunks are sent then.
        self.killed = threading.Event()
        self.killed_at = 0.0
        #: The first answer to a request sent after the kill: (time, status).
        self.first_after_kill: tuple[float, int] | None = None

    def accepted(self) -> list[str]:
        with self.lock:
            return list(self.ids)

    def via_api(self) -> None:
        with httpx.Client(base_url=self.base, headers={"Authorization": "Bearer key-f"},
                          timeout=30) as http:
            chunks = JOBS // 2 // CHUNK
            for chunk in range(chunks):
                if chunk == chunks - HELD_CHUNKS:
                    self.killed.wait(600)
                body = {"jobs": [{"prompt": PROMPT.format(who="api", i=chunk * CHUNK + k),
                                  "provider": "echo"} for k in range(CHUNK)]}
                while True:  # the same key each time: a retried chunk is accepted once
                    sent = time.time()
                    reply = http.post("/v1/jobs", json=body,
                                      headers={"Idempotency-Key": f"api-chunk-{chunk}"})
                    self.statuses.append((time.time(), reply.status_code,
                                          reply.headers.get("retry-after")))
                    if (self.killed.is_set() and sent >= self.killed_at
                            and self.first_after_kill is None):
                        self.first_after_kill = (time.time(), reply.status_code)
                    if reply.status_code == 201:
                        with self.lock:
                            self.ids.extend(reply.json()["ids"])
                        break
                    if reply.status_code != 503:
                        self.errors.append(f"API {reply.status_code}: {reply.text[:300]}")
                        return
                    time.sleep(float(reply.headers.get("retry-after", "1")) / 4)
                time.sleep(0.05)

    def via_client(self) -> None:
        with Client(self.settings) as client:
            for chunk in range(JOBS // 2 // CHUNK):
                jobs = [{"prompt": PROMPT.format(who="py", i=chunk * CHUNK + k),
                         "provider": "echo", "idempotency_key": f"py-{chunk}-{k}"}
                        for k in range(CHUNK)]
                while True:
                    try:
                        got = client.submit_many(jobs)
                        break
                    except (ServiceUnavailable, redis.RedisError):  # the same keys again
                        time.sleep(0.5)
                with self.lock:
                    self.ids.extend(got)
                time.sleep(0.05)


def _under_load(group: SentinelGroup, settings: Settings, store: JobStore,
                procs: Procs) -> None:
    fast = {"PROMPTBATCH_LEASE_TTL_S": "3", "PROMPTBATCH_RECONCILE_INTERVAL_S": "2",
            "PROMPTBATCH_MAX_PENDING_PER_TENANT": "100000"}
    procs.scheduler(True, **fast)
    procs.worker(4, **fast)
    procs.worker(4, **fast)
    port = free_port()
    api = procs.spawn("api", "--port", str(port),
                      PROMPTBATCH_API_KEYS=json.dumps({"key-f": "default"}), **fast)
    base = f"http://127.0.0.1:{port}"
    poll(lambda: _ready(base), timeout=60, interval=0.1, what="the API", proc=api)
    load = Load(settings, base)
    submitters = [threading.Thread(target=load.via_api),
                  threading.Thread(target=load.via_client)]
    for t in submitters:
        t.start()
    try:
        _fail_over(group, settings, store, load, submitters)
    finally:
        load.killed.set()  # never leave the API's submitter waiting


def _fail_over(group: SentinelGroup, settings: Settings, store: JobStore, load: Load,
               submitters: list[threading.Thread]) -> None:
    # About a third finished: note what is claimed or running and what has a result, then
    # SIGKILL the primary.
    poll(lambda: _finished(store) >= JOBS // 3, timeout=180, interval=0.05,
         what="a third of the jobs to finish")
    r = connect(settings.redis_url)
    seen = load.accepted()
    pipe = r.pipeline(transaction=False)
    for job_id in seen:
        pipe.hget(keys.job(job_id), "state")
        pipe.exists(keys.celery_result(job_id))
    replies = pipe.execute()
    at_kill = {j for j, st in zip(seen, replies[0::2], strict=True)
               if st in ("SCHEDULED", "RUNNING")}
    had_result = {j for j, got in zip(seen, replies[1::2], strict=True) if got}
    old = group.primary()
    old.kill()
    killed = load.killed_at = time.time()
    load.killed.set()  # the API's held chunks go now, before a sentinel can name another

    def first_result() -> bool:  # a result stored on the new primary since the kill
        with contextlib.suppress(Exception):
            if group.primary_port_now() == old.port:
                return False
            check = r.pipeline(transaction=False)
            for job_id in load.accepted():
                if job_id not in had_result:
                    check.exists(keys.celery_result(job_id))
            return any(check.execute())
        return False

    poll(first_result, timeout=120, interval=0.05, what="a result on the new primary")
    first_after = time.time() - killed

    for t in submitters:
        t.join(300)
    assert not load.errors, load.errors
    _check(load, store, settings, at_kill, killed, first_after)


def _check(load: Load, store: JobStore, settings: Settings, at_kill: set[str],
           killed: float, first_after: float) -> None:
    ids = load.accepted()
    assert len(ids) == JOBS and len(set(ids)) == JOBS
    try:
        poll(lambda: _finished(store) >= JOBS, timeout=300, interval=0.2,
             what="every job to end")
    except AssertionError:
        print(_unfinished(store, settings, ids))
        raise

    # Exactly one final state per job in SQL: no job lost, none added by a retried chunk.
    counts = store.count_by_state()
    assert sum(counts.values()) == JOBS, counts
    stored = store.get_many(ids)
    assert {j.state for j in stored.values()} == {JobState.SUCCEEDED}, counts
    # The same final state in the result backend, on the new primary.
    with Client(settings) as client:
        results = {res.id: res for res in client.results(ids, timeout=120)}
        assert set(results) == set(ids)
        assert {res.state for res in results.values()} == {JobState.SUCCEEDED}
        raw = client.r.pipeline(transaction=False)
        for job_id in ids:
            raw.exists(keys.celery_result(job_id))
        assert all(raw.execute()), "a result is missing from the result backend"

    # Provider calls, counted by the provider: one per job, more only for jobs whose batch
    # was claimed or running at the kill.
    calls = provider_calls(settings.echo_call_log)
    assert set(calls) == set(ids)
    repeated = {j for j, n in calls.items() if n > 1}
    assert repeated <= at_kill, sorted(repeated - at_kill)[:10]

    # The API during the failover: 503 with Retry-After, never a 500; then 201 again.
    codes = Counter(code for _, code, _ in load.statuses)
    assert set(codes) <= {201, 503}, codes
    assert all(after for _, code, after in load.statuses if code == 503)
    # The held chunks went at the kill: their first answer came while no primary was
    # named (a sentinel waits down_after_ms, 1 s, before it acts), and was a 503.
    during = [code for at, code, _ in load.statuses if killed <= at <= killed + first_after]
    assert load.first_after_kill is not None and during, "no request during the failover"
    at, first = load.first_after_kill
    assert first == 503 and at - killed < first_after and 503 in during, (first, during)
    assert load.statuses[-1][1] == 201
    print(f"\nfailover: first result {first_after:.2f} s after the SIGKILL; "
          f"{len(at_kill)} jobs claimed or running at the kill, {len(repeated)} called "
          f"twice; API answers {dict(codes)} ({len(during)} sent while there was no "
          f"primary); SQL {counts}")


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _finished(store: JobStore) -> int:
    try:
        return sum(n for state, n in store.count_by_state().items() if state in FINAL)
    except Exception:  # SQLite busy: ask again
        return 0


def _unfinished(store: JobStore, settings: Settings, ids: list[str]) -> str:
    """What SQL and Redis hold of the jobs that did not end (for a failure's report)."""
    rows = store.get_many(ids)
    left = [j for j in ids if j not in rows or not rows[j].state.final]
    r = connect(settings.redis_url)
    lines = [f"{len(left)} jobs did not end"]
    for job_id in left[:20]:
        state, batch = r.hmget(keys.job(job_id), "state", "batch")
        where = ""
        if batch:
            flying = [m for m in r.zrange(keys.INFLIGHT, 0, -1) if m.endswith(batch)]
            where = (f" in flight={flying}"
                     f" outbox={r.hexists(keys.OUTBOX, batch)}"
                     f" run={r.get(keys.batch_run(batch))!r}")
        sql = rows[job_id].state.value if job_id in rows else None
        lines.append(f"  {job_id}: SQL {sql}, Redis {state} batch {batch}{where}")
    return "\n".join(lines)

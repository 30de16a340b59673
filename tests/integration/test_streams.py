"""Streams that always end: every way a job ends ends its stream's readers, with the job's
real final state, whatever happened to the stream (real server; real processes where a
job must really run)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobResult, JobSpec, JobState, Priority
from jobs.outcomes import record_results
from jobs.queue import RedisQueue, celery_meta
from jobs.store import JobStore
from jobs.streams import Cursor, Event, follow, text_of
from producers.client import Client
from promptbatch.embedded import free_port
from tests.conftest import Procs
from tests.helpers import poll

pytestmark = pytest.mark.integration

DET: dict[str, Any] = {"params": {"temperature": 0}}


# --- the cursor: pure -------------------------------------------------------------------

def test_a_chunk_of_a_new_attempt_starts_it_even_without_its_marker() -> None:
    cursor = Cursor()
    events = cursor.take([("1-0", {"attempt": "a1"}), ("1-1", {"t": "half an ", "a": "a1"}),
                          # the marker of attempt a2 could not be written:
                          ("2-0", {"t": "whole ", "a": "a2"}), ("2-1", {"t": "answer", "a": "a2"}),
                          ("3-0", {"end": "SUCCEEDED"})])
    assert [e.kind for e in events] == ["attempt", "chunk", "attempt", "chunk", "chunk", "end"]
    assert text_of(events) == "whole answer"  # not "half an whole answer"
    assert cursor.ended and cursor.after == "3-0"


def test_a_resumed_cursor_keeps_the_attempt_it_was_reading() -> None:
    cursor = Cursor("1-1", attempt="a1")
    events = cursor.take([("1-2", {"t": "more", "a": "a1"})])
    assert [e.kind for e in events] == ["chunk"]


def test_the_time_bound_waits_for_a_quiet_stream() -> None:
    assert not Cursor.timed_out(None, 100.0, got=False)
    assert not Cursor.timed_out(50.0, 100.0, got=True)  # text still arriving
    assert Cursor.timed_out(50.0, 100.0, got=False)
    assert Cursor.block_ms(100.2, 100.0) == 200


# --- readers of a real stream -------------------------------------------------------------

def _spec(stream: bool = True) -> JobSpec:
    return JobSpec(id=str(uuid.uuid4()), tenant="acme", priority=Priority.NORMAL,
                   created_at=time.time(), provider="echo", model="echo-1", prompt="hi",
                   stream=stream)


def _follow_in_thread(r: redis.Redis, job_id: str) -> tuple[list[Event], threading.Event,
                                                             list[float]]:
    events: list[Event] = []
    ended = threading.Event()
    at: list[float] = []

    def run() -> None:
        for e in follow(r, job_id):
            events.append(e)
        at.append(time.monotonic())
        ended.set()

    threading.Thread(target=run, daemon=True).start()
    return events, ended, at


def test_a_reader_ends_within_a_second_when_the_stream_never_gets_its_end(
        r: redis.Redis) -> None:
    spec = _spec()
    name = keys.job_stream(spec.id)
    r.xadd(name, {"attempt": "a1"})
    r.xadd(name, {"t": "partial", "a": "a1"})
    events, ended, at = _follow_in_thread(r, spec.id)
    poll(lambda: any(e.kind == "chunk" for e in events), timeout=5, what="the chunk")
    # The result is stored, and the stream's end entry is never written (a worker whose
    # end write failed; a job the reconciler finished).
    stored_at = time.monotonic()
    r.set(keys.celery_result(spec.id), celery_meta(JobResult(
        id=spec.id, state=JobState.EXPIRED, error="deadline passed")))
    assert ended.wait(5)
    assert at[0] - stored_at < 1.0
    assert (events[-1].kind, events[-1].text) == ("end", "EXPIRED")


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.FAILED, JobState.EXPIRED,
                                   JobState.CANCELLED])
def test_every_way_a_job_ends_appends_the_end_of_its_stream(
        settings: Settings, r: redis.Redis, state: JobState) -> None:
    store = JobStore(settings.database_url)
    queue = RedisQueue(r)
    spec = _spec()
    store.insert([spec])
    queue.stage([spec], ttl_s=600, max_pending=0, publish=True)
    r.xadd(keys.job_stream(spec.id), {"attempt": "a1"})  # a stream that was under way
    events, ended, _ = _follow_in_thread(r, spec.id)
    record_results(store, queue, [JobResult(id=spec.id, state=state, text="x"
                                            if state is JobState.SUCCEEDED else None)],
                   [spec.tenant], result_ttl_s=600)
    assert ended.wait(5)
    last = r.xrevrange(keys.job_stream(spec.id), count=1)[0][1]
    assert last == {"end": state.value}
    assert events[-1].kind == "end" and events[-1].text == state.value
    store.close()


def test_a_job_without_a_stream_ends_its_reader_with_its_state(r: redis.Redis) -> None:
    spec = _spec(stream=False)
    r.set(keys.celery_result(spec.id), celery_meta(JobResult(
        id=spec.id, state=JobState.SUCCEEDED, text="cached", cache="exact")))
    events = list(follow(r, spec.id))
    assert events == [Event("0-0", "end", "SUCCEEDED")]  # a success's meta has no copy


def test_a_reader_with_a_bound_ends_with_a_timeout(r: redis.Redis) -> None:
    started = time.monotonic()
    events = list(follow(r, "never-finishes", until=time.time() + 0.3))
    assert [e.kind for e in events] == ["timeout"]
    assert time.monotonic() - started < 2.0


# --- the end event's state, for jobs that ran through the services ---------------------

@pytest.mark.slow
def test_the_end_event_carries_each_jobs_real_final_state(settings: Settings,
                                                          procs: Procs) -> None:
    from tests.fake_llm import FakeServer

    with FakeServer() as fake:
        fake.script("too long for you", ["context"])
        env = {"PROMPTBATCH_OPENAI_BASE_URL": f"{fake.url}/v1",
               "PROMPTBATCH_OPENAI_PREFIX_STRATEGY": "parallel"}
        procs.scheduler(**env)
        with Client(settings) as client:
            # Before any worker: a cancelled job, two identical jobs (one coalesced), an
            # expired one.
            cancelled = client.submit("cancel me", stream=True)
            assert client.cancel(cancelled) is JobState.CANCELLED
            leader, follower = (client.submit("Same question", stream=True, **DET)
                                for _ in range(2))
            assert client.queue.states([follower]) == ["FOLLOWING"]
            expired = client.submit("too late", stream=True, timeout_s=0.05)
            procs.worker(1, **env)
            failed = client.submit("too long for you", provider="openai",
                                   model="gpt-test", stream=True)
            for job in (leader, follower, expired, failed):
                client.result(job, timeout=60)
            answered = client.submit_many_states([{"prompt": "Same question",
                                                   "stream": True, **DET}])
            assert answered[0][1] is JobState.SUCCEEDED  # answered at submit
            states = {}
            for name, job in (("cancelled", cancelled), ("coalesced", follower),
                              ("leader", leader), ("expired", expired), ("failed", failed),
                              ("answered", answered[0][0])):
                events = list(client.stream(job, timeout=10))
                assert events[-1].kind == "end", (name, events)
                states[name] = events[-1].text
            assert client.result(follower).cache == "coalesced"
    assert states == {"cancelled": "CANCELLED", "coalesced": "SUCCEEDED",
                      "leader": "SUCCEEDED", "expired": "EXPIRED", "failed": "FAILED",
                      "answered": "SUCCEEDED"}


# --- the API's streams --------------------------------------------------------------------

@pytest.mark.slow
def test_the_apis_streams_refuse_a_bad_last_event_id_and_end_at_their_bound(
        settings: Settings, procs: Procs) -> None:
    port = free_port()
    proc = procs.spawn("api", "--port", str(port),
                       PROMPTBATCH_API_KEYS=json.dumps({"key-a": "acme"}),
                       PROMPTBATCH_API_STREAM_MAX_S="1")
    base = f"http://127.0.0.1:{port}"
    poll(lambda: _status(f"{base}/readyz") == 200, timeout=60, interval=0.1, what="the API",
         proc=proc)
    headers = {"Authorization": "Bearer key-a"}
    # No scheduler: the job stays queued, so only the bound can end the streams.
    job = httpx.post(f"{base}/v1/jobs", headers=headers,
                     json={"prompt": "wait", "stream": True}).json()["id"]
    bad = httpx.get(f"{base}/v1/jobs/{job}/stream",
                    headers={**headers, "Last-Event-ID": "a-b"}, timeout=10)
    assert bad.status_code == 400
    assert bad.json()["error"]["errors"][0]["field"] == "Last-Event-ID"
    started = time.monotonic()
    body = httpx.get(f"{base}/v1/jobs/{job}/stream", headers=headers, timeout=10).text
    assert "event: timeout" in body and time.monotonic() - started < 5
    started = time.monotonic()
    chat = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=10,
                      json={"model": "echo-1", "stream": True,
                            "messages": [{"role": "user", "content": "wait too"}]}).text
    assert '"code": "timeout"' in chat and time.monotonic() - started < 5


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


# --- a job whose result left Redis ----------------------------------------------------------

def _final_only_in_sql(settings: Settings, r: redis.Redis, spec: JobSpec,
                       state: JobState = JobState.SUCCEEDED) -> None:
    """``spec`` ran to ``state`` with its stream, then its result and its stream expired
    from Redis (``result_ttl_s``, 7 days) while SQL keeps the job (30 days)."""
    store = JobStore(settings.database_url)
    queue = RedisQueue(r)
    if store.get(spec.id) is None:
        store.insert([spec])
        queue.stage([spec], ttl_s=600, max_pending=0, publish=True)
    r.xadd(keys.job_stream(spec.id), {"attempt": "a1"})
    r.xadd(keys.job_stream(spec.id), {"t": "the answer", "a": "a1"})
    record_results(store, queue, [JobResult(
        id=spec.id, state=state, text="the answer" if state is JobState.SUCCEEDED else None,
        error=None if state is JobState.SUCCEEDED else "it ended")],
        [spec.tenant], result_ttl_s=600)
    r.delete(keys.celery_result(spec.id), keys.job_stream(spec.id))
    store.close()


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.CANCELLED])
def test_the_python_clients_stream_of_a_job_known_only_to_sql_ends_at_once(
        settings: Settings, r: redis.Redis, state: JobState) -> None:
    spec = _spec()
    _final_only_in_sql(settings, r, spec, state)
    with Client(settings) as client:
        started = time.monotonic()
        events = list(client.stream(spec.id, timeout=10))
        took = time.monotonic() - started
    assert [(e.kind, e.text) for e in events] == [("end", state.value)]
    assert took < 2.0, f"the stream ended after {took:.1f} s"


def test_every_api_stream_of_a_job_known_only_to_sql_ends_at_once(
        settings: Settings, r: redis.Redis) -> None:
    from promptbatch.http import Client as HttpClient
    from tests.integration.test_api import KEY_A, Api

    api = Api(settings, api_stream_max_s=20.0, api_max_wait_s=20.0).start()
    try:
        spec = _spec().model_copy(update={"tenant": "tenant-a"})
        _final_only_in_sql(settings, r, spec, JobState.CANCELLED)
        started = time.monotonic()
        body = api.a.get(f"/v1/jobs/{spec.id}/stream", timeout=15).text
        assert "event: end" in body and '"state": "CANCELLED"' in body, body
        with HttpClient(api.url, KEY_A, timeout=15) as pb:
            events = list(pb.stream(spec.id))
        assert [(e.kind, e.text) for e in events] == [("end", "CANCELLED")]
        took = time.monotonic() - started
        assert took < 4.0, f"the two streams took {took:.1f} s"
    finally:
        api.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_a_chat_call_repeated_after_its_result_left_redis_answers_at_once(
        settings: Settings, r: redis.Redis, stream: bool) -> None:
    from tests.integration.test_api import Api

    api = Api(settings, api_stream_max_s=1.0, api_max_wait_s=1.0).start()
    try:
        call = {"model": "echo-1", "stream": stream,
                "messages": [{"role": "user", "content": "what is the answer?"}]}
        headers = {"Idempotency-Key": "question-7"}
        # No scheduler: the first call's job waits, and the call ends at the API's bound.
        first = api.a.post("/v1/chat/completions", json=call, headers=headers, timeout=15)
        assert first.status_code == (200 if stream else 504), first.text
        store = JobStore(settings.database_url)
        [stored] = store.list_jobs("tenant-a")
        store.close()
        spec, job_id = stored.spec, stored.spec.id
        _final_only_in_sql(settings, r, spec)  # it ran, days ago; Redis forgot it
        # The same call again (the caller's retry): the job's answer, not the bound's 504.
        again = api.a.post("/v1/chat/completions", json=call, headers=headers, timeout=30)
        assert again.status_code == 200, again.text
        assert again.headers["x-promptbatch-job-id"] == job_id
        if stream:
            assert '"content": "the answer"' in again.text and "[DONE]" in again.text, again.text
        else:
            assert again.json()["choices"][0]["message"]["content"] == "the answer"
    finally:
        api.stop()

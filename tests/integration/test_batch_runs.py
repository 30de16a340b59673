"""Which deliveries of a batch count as poison, and which batch may run a job: a real
Redis-compatible server, SQLite and the echo provider in this process."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from tests.helpers import provider_calls
from workers.batch import BatchRunner
from workers.providers import create_provider

pytestmark = pytest.mark.integration


def claimed(client: Client, batch_id: str, n: int, cls: int = 2) -> list[str]:
    """Submit ``n`` jobs and claim them for ``batch_id`` as the scheduler does."""
    ids = client.submit_many({"prompt": f"job {i}"} for i in range(n))
    assert client.queue.acquire_lease("test-scheduler", 30)
    got = client.queue.claim("test-scheduler", batch_id, "{}",
                             [(i, client.settings.default_tenant) for i in ids], time.time(),
                             cls)
    assert got == ids
    return ids


def runner(settings: Settings, client: Client,
           sent: list[tuple[str, str, str, int]] | None = None) -> BatchRunner:
    return BatchRunner(settings, client.queue, client.store,
                       lambda name: create_provider(name, settings),
                       resend=None if sent is None else lambda *a: sent.append(a))


def test_only_deliveries_after_a_lost_worker_count_toward_poison(r: redis.Redis) -> None:
    from jobs.queue import RedisQueue

    q = RedisQueue(r)

    def start(batch: str, send: str, retries: int) -> int | None:
        return q.start_run(batch, send, retries, 60, 2, time.time())

    # A batch retried five times by its task (Redis or SQL errors): new messages.
    assert [start("blips", "send", n) for n in range(5)] == [0, 0, 0, 0, 0]
    # A batch whose message came back twice after its worker was lost.
    assert [start("crashes", "send", 0) for _ in range(3)] == [0, 1, 2]
    assert start("crashes", "send", 1) == 2  # a later retry keeps the count
    # A task's start: the first send runs, its re-delivery runs again (one delivery lost),
    # another send of the same batch does not run and is not counted.
    assert start("b", "send-1", 0) == 0
    assert start("b", "send-2", 0) is None
    assert start("b", "send-1", 0) == 1
    assert r.hgetall(keys.batch_deliveries("b")) == {"0": "2"}


def test_a_copy_of_a_running_delivery_does_not_run_but_a_redelivery_takes_over(
        r: redis.Redis) -> None:
    """A broker failover can hand out a message a second time, unmarked (its pop was lost
    with the old primary): that copy must not call the provider while the first runs."""
    from jobs.queue import RedisQueue

    q = RedisQueue(r)

    def start(token: str, redelivered: bool, retries: int = 0) -> int | None:
        return q.start_run("b", "send-1", retries, 60, 2, time.time(), token=token,
                           redelivered=redelivered)

    assert start("first", redelivered=False) == 0
    assert start("copy", redelivered=False) is None  # another worker's copy: not run
    assert start("first", redelivered=False) == 0  # its own start again: runs, not counted
    assert start("after-loss", redelivered=True) == 1  # the broker says: worker lost
    assert start("first", redelivered=False) is None  # the lost one no longer runs it
    assert start("retry", redelivered=False, retries=1) == 1  # the task's own retry
    assert r.hgetall(keys.batch_deliveries("b")) == {"0": "2", "1": "1"}


def test_a_job_runs_only_in_the_batch_that_claimed_it(settings: Settings) -> None:
    with Client(settings) as client:
        ids = claimed(client, "batch-a", 2)
        run = runner(settings, client)
        other = run.run("batch-b", "send-1", ids)  # another batch naming the same jobs
        assert other["jobs"] == 0 and other["skipped"] == 2
        assert provider_calls(settings.echo_call_log) == Counter()
        assert run.run("batch-a", "send-1", ids)["jobs"] == 2
        assert provider_calls(settings.echo_call_log) == Counter(ids)


def test_a_poison_split_moves_each_job_to_a_batch_of_its_own_counted_in_flight(
        settings: Settings, r: redis.Redis) -> None:
    with Client(settings) as client:
        ids = claimed(client, "batch-a", 3, cls=3)
        for _ in range(settings.max_deliveries + 1):  # the batch killed its worker 3 times
            client.queue.start_run("batch-a", "send-1", 0, 60, 3, time.time())
        sent: list[tuple[str, str, str, int]] = []
        run = runner(settings, client, sent)
        assert sorted(run.run("batch-a", "send-1", ids, cls=3)["split"]) == sorted(ids)
        assert sorted(j for *_, j, _ in sent) == sorted(ids) and {c for *_, c in sent} == {3}
        assert {old for old, *_ in sent} == {"batch-a"}  # named in the new tasks
        inflight = set(r.zrange(keys.INFLIGHT, 0, -1))
        assert {keys.inflight_member(3, b) for _, b, _, _ in sent} <= inflight
        assert keys.inflight_member(3, "batch-a") not in inflight
        assert run.run("batch-a", "send-1", ids, cls=3)["jobs"] == 0  # not the old batch's
        for _, new_batch, job_id, cls in sent:
            assert run.run(new_batch, "send-2", [job_id], cls=cls)["jobs"] == 1
        assert provider_calls(settings.echo_call_log) == Counter(ids)
        assert r.zcard(keys.INFLIGHT) == 0


def test_jobs_of_a_lost_batch_go_back_to_intake_and_the_lost_batch_cannot_run_them(
        settings: Settings, r: redis.Redis) -> None:
    from scheduler.reconcile import reconcile

    s = settings.model_copy(update={"reconcile_grace_s": 0.0})
    with Client(s) as client:
        ids = claimed(client, "lost-batch", 2)
        kept = claimed(client, "live-batch", 1)
        # The lost batch's task is gone (dropped while Redis was down) and so is its
        # in-flight entry; the live batch is still in flight.
        client.queue.batch_done("lost-batch", 2)
        repairs = reconcile(client.store, client.queue, s, time.time())
        assert repairs.requeued == 2
        assert client.queue.states(ids) == ["QUEUED", "QUEUED"]
        assert client.queue.states(kept) == ["SCHEDULED"]
        entries = r.xrange(keys.INTAKE)
        assert sorted(f["id"] for _, f in entries) == sorted(ids)
        assert runner(s, client).run("lost-batch", "send-1", ids)["jobs"] == 0
        assert provider_calls(s.echo_call_log) == Counter()


def test_a_batch_that_starts_too_late_for_a_deadline_expires_that_job_unsent(
        settings: Settings) -> None:
    with Client(settings) as client:
        late = client.submit("needs an answer within three seconds", timeout_s=3)
        fine = client.submit("no hurry")
        assert client.queue.acquire_lease("test-scheduler", 30)
        client.queue.claim("test-scheduler", "b", "{}", [(late, "default"), (fine, "default")],
                           time.time(), 2)
        # The scheduler estimated 5 s for this batch: the 3 s job cannot make it.
        out = runner(settings, client).run("b", "send-1", [late, fine], estimate_s=5.0)
        assert (out["jobs"], out["expired"]) == (1, 1)
        res = client.result(late, timeout=5)
        assert res.state is JobState.EXPIRED and res.error is not None
        assert "too close" in res.error
        assert provider_calls(settings.echo_call_log) == Counter([fine])


def test_a_rerun_copies_results_a_dead_worker_stored_only_in_sql(settings: Settings) -> None:
    from jobs.models import JobResult

    with Client(settings) as client:
        ids = claimed(client, "batch-d", 3)
        # The first worker stored one job's result in SQL and died before its Redis write.
        first = JobResult(id=ids[0], state=JobState.SUCCEEDED, text="the first answer",
                          provider="echo", model="echo-1", batch_id="batch-d")
        assert client.store.finalize([first]) == [ids[0]]
        assert client.queue.results([ids[0]]) == [None]
        out = runner(settings, client).run("batch-d", "send-1", ids)  # the re-delivery
        assert out["succeeded"] == 3
        stored = client.queue.results(ids)
        assert stored[0] is not None and stored[0].text == "the first answer"  # not the rerun's
        assert all(s is not None for s in stored)


def test_results_in_sql_that_the_backend_lost_are_written_back_once(
        settings: Settings, r: redis.Redis) -> None:
    from jobs.models import JobResult, JobState
    from scheduler.reconcile import reconcile

    s = settings.model_copy(update={"reconcile_grace_s": 0.0})
    with Client(s) as client:
        ids = client.submit_many({"prompt": f"q{i}"} for i in range(3))
        now = time.time()
        results = [JobResult(id=i, state=JobState.SUCCEEDED, text=f"a{n}", finished_at=now)
                   for n, i in enumerate(ids)]
        client.store.finalize(results)  # SQL has all three results...
        client.queue.finish(results[:1], [s.default_tenant], result_ttl_s=60)  # ...Redis one
        repairs = reconcile(client.store, client.queue, s, time.time())
        assert repairs.written_back == 2
        assert [x.text for x in client.queue.results(ids)] == ["a0", "a1", "a2"]  # type: ignore[union-attr]
        assert reconcile(client.store, client.queue, s, time.time()).written_back == 0


def test_a_result_that_expired_is_not_written_back_nor_counted_again(
        settings: Settings, r: redis.Redis) -> None:
    from jobs.models import JobResult, JobState
    from jobs.stats import read_totals
    from scheduler.reconcile import reconcile

    s = settings.model_copy(update={"reconcile_grace_s": 0.0, "result_ttl_s": 600})
    with Client(s) as client:
        ids = client.submit_many({"prompt": f"q{i}"} for i in range(2))
        now = time.time()
        old, recent = (JobResult(id=ids[0], state=JobState.SUCCEEDED, text="old",
                                 finished_at=now - 700),
                       JobResult(id=ids[1], state=JobState.SUCCEEDED, text="recent",
                                 finished_at=now - 5))
        # Both final in SQL only: the result backend never got them (it was down). The
        # old one would have expired by now (700 s ago, a 600 s TTL) anyway.
        client.store.finalize([old, recent])
        finished = sum(c.value for c in read_totals(r) if c.kind == "finished")
        # A pass over many rows reaches these minutes after it began: one begun 200 s ago.
        repairs = reconcile(client.store, client.queue, s, time.time() - 200)
        assert repairs.written_back == 1
        assert [x.text if x else None for x in client.queue.results(ids)] == [None, "recent"]
        assert sum(c.value for c in read_totals(r) if c.kind == "finished") == finished + 1


def ends(r: redis.Redis, batch_id: str) -> list[dict[str, str]]:
    """What the scheduler was told of ``batch_id``'s end (``pb:events``)."""
    return [f for _, f in r.xrange(keys.EVENTS) if f.get("done") == batch_id]


def test_every_ending_of_a_batch_tells_the_scheduler_but_a_second_send_and_a_retry(
        settings: Settings, r: redis.Redis) -> None:
    with Client(settings) as client:
        run = runner(settings, client, sent=[])
        # Nothing to run: every job was cancelled while the batch waited in the broker.
        ids = claimed(client, "cancelled", 2)
        assert client.cancel_many(ids) == dict.fromkeys(ids, JobState.CANCELLED)
        assert run.run("cancelled", "send-1", ids)["jobs"] == 0
        assert ends(r, "cancelled") == [{"done": "cancelled", "ended": "nothing to run"}]
        # A poison batch split into batches of one job each.
        ids = claimed(client, "poison", 2)
        for _ in range(settings.max_deliveries + 1):
            client.queue.start_run("poison", "send-1", 0, 60, 2, time.time())
        assert run.run("poison", "send-1", ids)["split"]
        assert ends(r, "poison") == [{"done": "poison", "ended": "poison"}]
        # A second send of a batch that another worker runs: that worker tells.
        ids = claimed(client, "running", 1)
        assert client.queue.start_run("running", "send-1", 0, 60, 2, time.time()) == 0
        assert run.run("running", "send-2", ids)["skipped"] == "duplicate send"
        assert ends(r, "running") == []
        # A batch that ran: its call's timing.
        ids = claimed(client, "ran", 2)
        assert run.run("ran", "send-1", ids)["jobs"] == 2
        (told,) = ends(r, "ran")
        assert told["deployment"] == "echo|echo-1" and told["size"] == "2"
        assert float(told["seconds"]) > 0 and "ended" not in told

"""A model-based test of the queue's protocol, on a real Valkey and a real SQLite file.

Hypothesis runs random sequences of what the parts of promptbatch do to a job: submit
(one or many, identical requests among them), claim a batch, start it, finish it or
fail it, split it, cancel, expire, lose a worker, reconcile, and a change of the
scheduler lease. Each step goes through the code the services run (the client's submit,
``RedisQueue``'s Lua steps, ``record_results``, the reconciler); after every step the
system is compared with a small pure model of where each job must be:

* every job is in exactly the state the model says, in Redis and in SQL;
* a final job has one result, the same in SQL and in the result backend; a job that is
  not final has none;
* a job scheduled or running is in the batch the model says (never in two);
* the counters balance per class and deployment: submitted = finished + pending;
* each tenant's pending set holds exactly the jobs the model says are waiting.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from config import keys
from config.settings import Settings
from jobs import cache
from jobs.models import JobResult, JobState
from jobs.outcomes import record_results
from jobs.queue import RedisQueue
from jobs.stats import class_name, read_totals
from jobs.store import JobStore
from producers.client import Client
from scheduler.reconcile import Reconciler

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINAL = {"SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED"}
#: Runs of up to 40 steps; a longer search: PROMPTBATCH_MODEL_EXAMPLES=2000.
EXAMPLES = int(os.environ.get("PROMPTBATCH_MODEL_EXAMPLES", "60"))
TENANTS = ("acme", "globex")
TTL = 3600


@dataclass
class Job:
    """The model's record of one job."""

    id: str
    tenant: str
    cls: int
    request: tuple[str, int]  #: (tenant, hash of the request): identical ones
    state: str = "QUEUED"
    batch: str | None = None
    waiting: bool = True  #: in its tenant's pending set
    leader: str | None = None  #: the job it follows (coalesced)
    final: str | None = None  #: the final state stored
    text: str | None = None
    answered: bool = False  #: answered at its submit by the exact cache (no job hash)


@dataclass
class Batch:
    id: str
    cls: int
    jobs: list[str] = field(default_factory=list)
    started: bool = False


class Protocol(RuleBasedStateMachine):
    def __init__(self, s: Settings) -> None:
        super().__init__()
        self.s = s
        self.r = redis.Redis.from_url(s.redis_url, decode_responses=True)
        self.r.flushall()
        self.store = JobStore(s.database_url)
        with self.store.engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs"))
        self.queue = RedisQueue(self.r)
        self.client = Client(s)
        self.jobs: dict[str, Job] = {}
        self.batches: dict[str, Batch] = {}
        self.token = f"scheduler-{uuid.uuid4().hex[:6]}"
        self.old_tokens: list[str] = []
        self.n = 0

    def teardown(self) -> None:
        self.client.close()
        self.store.close()
        self.r.close()

    # --- helpers --------------------------------------------------------------------

    def _in(self, *states: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.state in states]

    def _record(self, results: list[JobResult], *, cache_answers: bool = False) -> set[str]:
        jobs = [self.jobs[r.id] for r in results]
        put = None
        if cache_answers:  # as a worker does: successful answers go to the exact cache
            specs = {i: st.spec for i, st in self.store.get_many([r.id for r in results]).items()}
            put = (lambda mine: cache.put(self.queue, self.s, mine, specs))  # noqa: E731
        return record_results(self.store, self.queue, results, [j.tenant for j in jobs],
                              result_ttl_s=TTL, classes=[j.cls for j in jobs],
                              before_publish=put)

    def _result(self, job: Job, state: JobState) -> JobResult:
        return JobResult(id=job.id, state=state, provider="echo", model="echo-1",
                         text=f"answer to {job.request}" if state is JobState.SUCCEEDED
                         else None, error=None if state is JobState.SUCCEEDED else state.value,
                         created_at=time.time(), finished_at=time.time())

    def _made_final(self, job: Job, state: str, text_: str | None) -> None:
        job.state, job.final, job.text, job.batch, job.waiting = state, state, text_, None, False
        # Its followers: the leader's answer if it succeeded, else they run on their own.
        for f in [f for f in self.jobs.values() if f.leader == job.id and f.state == "FOLLOWING"]:
            f.leader = None
            if state == "SUCCEEDED":
                f.state, f.final, f.text, f.waiting = "SUCCEEDED", "SUCCEEDED", text_, False
            else:
                f.state = "QUEUED"
        for f in self.jobs.values():
            if f.leader == job.id:
                f.leader = None

    # --- steps ----------------------------------------------------------------------

    @initialize(n=st.integers(1, 6), identical=st.booleans())
    def lease_and_first_jobs(self, n: int, identical: bool) -> None:
        assert self.queue.acquire_lease(self.token, 60)
        self.submit(n, TENANTS[0], 4, identical, True)  # every run starts with work

    @rule(n=st.integers(1, 4), tenant=st.sampled_from(TENANTS), cls=st.integers(0, 4),
          identical=st.booleans(), deterministic=st.booleans())
    def submit(self, n: int, tenant: str, cls: int, identical: bool,
               deterministic: bool) -> None:
        items = []
        requests = []
        for i in range(n):
            prompt = "the same question" if identical else f"question {self.n + i}"
            item: dict[str, object] = {"prompt": prompt, "priority": cls, "tenant": tenant,
                                       "provider": "echo", "model": "echo-1"}
            if deterministic:
                item["params"] = {"temperature": 0}
            items.append(item)
            requests.append((prompt, deterministic))
        self.n += n
        submitted = self.client.submit_many_states(items)
        ids = [i for i, _ in submitted]
        states = self.queue.states(ids)
        for (job_id, at_submit), (prompt, det), state in zip(submitted, requests, states,
                                                             strict=True):
            job = Job(job_id, tenant, cls, (tenant, hash((prompt, det))))
            if at_submit is JobState.SUCCEEDED:
                # Answered by the exact cache: an identical, deterministic request of the
                # same tenant succeeded before; the answer is the same.
                res = self.queue.results([job_id])[0]
                assert det and state is None and res is not None
                before = [j for j in self.jobs.values() if j.request == job.request
                          and j.final == "SUCCEEDED" and not j.answered]
                assert res.text in {j.text for j in before}, "a cached answer from nowhere"
                job.state = job.final = "SUCCEEDED"
                job.text, job.waiting, job.answered = res.text, False, True
            elif state == "FOLLOWING":
                lead = self.r.hget(keys.job(job_id), "lead")
                leader = self.jobs.get(str(lead))
                # Only an identical, deterministic request follows, and only a job that
                # has not ended.
                assert det and leader is not None and leader.request[0] == tenant
                assert leader.final is None, "followed a final job"
                job.state, job.leader = "FOLLOWING", leader.id
            else:
                assert state == "QUEUED", state
            self.jobs[job_id] = job

    @precondition(lambda self: self._in("QUEUED"))
    @rule(k=st.integers(1, 5), offer_another=st.booleans(), data=st.data())
    def claim(self, k: int, offer_another: bool, data: st.DataObject) -> None:
        queued = self._in("QUEUED")
        if not queued:
            return
        chosen = data.draw(st.lists(st.sampled_from(queued), min_size=1, max_size=k,
                                    unique_by=lambda j: j.id))
        # Now and then a job the model knows is not QUEUED is offered too: it is skipped.
        others = self._in("CANCELLED", "SCHEDULED", "RUNNING", "FOLLOWING", *FINAL)
        if others and offer_another:
            chosen.append(data.draw(st.sampled_from(others)))
        cls = chosen[0].cls
        batch = Batch(f"b-{uuid.uuid4().hex[:8]}", cls)
        got = self.queue.claim(self.token, batch.id, f'{{"cls": {cls}}}',
                               [(j.id, j.tenant) for j in chosen], time.time(), cls)
        assert got is not None
        expected = [j.id for j in chosen if j.state == "QUEUED"]
        assert got == expected
        for job_id in got:
            j = self.jobs[job_id]
            j.state, j.batch, j.waiting = "SCHEDULED", batch.id, False
        batch.jobs = got
        if got:
            self.batches[batch.id] = batch

    @precondition(lambda self: self.old_tokens)
    @rule()
    def a_former_scheduler_claims_nothing(self) -> None:
        queued = self._in("QUEUED")
        if queued:
            j = queued[0]
            assert self.queue.claim(self.old_tokens[-1], "stale", "{}", [(j.id, j.tenant)],
                                    time.time(), j.cls) is None
            assert self.queue.take_to_expire(self.old_tokens[-1], [(j.id, j.tenant)]) is None

    @precondition(lambda self: any(not b.started for b in self.batches.values()))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        waiting = [b for b in self.batches.values() if not b.started]
        if not waiting:
            return
        b = data.draw(st.sampled_from(waiting))
        assert self.queue.start_run(b.id, "send-1", 0, TTL, b.cls, time.time()) is not None
        # A second send of the same batch (a duplicate message) does not run.
        assert self.queue.start_run(b.id, "send-2", 0, TTL, b.cls, time.time()) is None
        specs, found = self.queue.load_and_mark(b.id, b.jobs)
        for job_id, spec, state in zip(b.jobs, specs, found, strict=True):
            j = self.jobs[job_id]
            if j.state in ("SCHEDULED", "RUNNING") and j.batch == b.id:
                assert state == "RUNNING" and spec is not None and spec.id == job_id
                j.state = "RUNNING"
            else:
                assert spec is None
                assert state == ("OTHER" if j.state in ("SCHEDULED", "RUNNING") else j.state)
        b.started = True

    @precondition(lambda self: any(b.started for b in self.batches.values()))
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data: st.DataObject, ok: bool) -> None:
        started = [b for b in self.batches.values() if b.started]
        if not started:
            return
        b = data.draw(st.sampled_from(started))
        running = [self.jobs[i] for i in b.jobs
                   if self.jobs[i].state == "RUNNING" and self.jobs[i].batch == b.id]
        state = JobState.SUCCEEDED if ok else JobState.FAILED
        results = [self._result(j, state) for j in running]
        won = self._record(results, cache_answers=True) if results else set()
        assert won == {j.id for j in running}
        self.queue.batch_done(b.id, b.cls)
        del self.batches[b.id]
        for j, res in zip(running, results, strict=True):
            self._made_final(j, state.value, res.text)

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def split(self, data: st.DataObject) -> None:
        if not self.batches:
            return
        b = data.draw(st.sampled_from(list(self.batches.values())))
        moves = [(i, f"b-{uuid.uuid4().hex[:8]}", b.cls) for i in b.jobs]
        moved = self.queue.reassign(b.id, moves, time.time())
        self.queue.batch_done(b.id, b.cls)
        del self.batches[b.id]
        for (job_id, new_id, cls), ok in zip(moves, moved, strict=True):
            j = self.jobs[job_id]
            should = j.state in ("SCHEDULED", "RUNNING") and j.batch == b.id
            assert ok == should
            if ok:
                j.state, j.batch = "SCHEDULED", new_id
                self.batches[new_id] = Batch(new_id, cls, [job_id])

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if not self.jobs:
            return
        j = data.draw(st.sampled_from(list(self.jobs.values())))
        found = self.queue.cancel(j.id)
        assert found == ("" if j.answered else j.state)
        if j.state in ("QUEUED", "SCHEDULED", "FOLLOWING"):
            j.state = "CANCELLED"

    @rule()
    def the_scheduler_ends_the_cancelled(self) -> None:
        cancelled = [j for j in self._in("CANCELLED") if j.final is None]
        if not cancelled:
            return
        won = self._record([self._result(j, JobState.CANCELLED) for j in cancelled])
        assert won == {j.id for j in cancelled}
        for j in cancelled:
            self._made_final(j, "CANCELLED", None)

    @precondition(lambda self: self._in("QUEUED"))
    @rule(k=st.integers(1, 3))
    def expire(self, k: int) -> None:
        queued = self._in("QUEUED")[:k]
        if not queued:
            return
        taken = self.queue.take_to_expire(self.token, [(j.id, j.tenant) for j in queued])
        assert taken == [j.id for j in queued]
        won = self._record([self._result(j, JobState.EXPIRED) for j in queued])
        assert won == set(taken)
        for j in queued:
            self._made_final(j, "EXPIRED", None)

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def lose_a_worker(self, data: st.DataObject) -> None:
        """A batch's task is lost: it leaves the in-flight set and the scheduler puts its
        jobs back into intake (a new batch will run them; the old one no longer can)."""
        if not self.batches:
            return
        b = data.draw(st.sampled_from(list(self.batches.values())))
        self.queue.batch_done(b.id, b.cls)
        del self.batches[b.id]
        for job_id in b.jobs:
            j = self.jobs[job_id]
            spec = self.store.get(job_id)
            assert spec is not None
            done = self.queue.requeue(spec.spec, b.id, self.token)
            mine = j.state in ("SCHEDULED", "RUNNING") and j.batch == b.id
            assert done == mine
            if mine:
                j.state, j.batch, j.waiting = "QUEUED", None, True

    @rule()
    def reconcile(self) -> None:
        """A whole pass finds nothing to repair but the cancellations SQL lacks."""
        rec = Reconciler(self.store, self.queue, self.s, self.token)
        repairs = rec.run_pass(time.time())
        cancelled = [j for j in self._in("CANCELLED") if j.final is None]
        assert (repairs.reenqueued, repairs.requeued, repairs.written_back) == (0, 0, 0)
        assert repairs.finished == len(cancelled)
        for j in cancelled:
            self._made_final(j, "CANCELLED", None)

    @rule()
    def lease_change(self) -> None:
        self.queue.release_lease(self.token)
        self.old_tokens.append(self.token)
        self.token = f"scheduler-{uuid.uuid4().hex[:6]}"
        assert self.queue.acquire_lease(self.token, 60)
        assert not self.queue.acquire_lease(self.old_tokens[-1], 60)

    # --- what must hold after every step ----------------------------------------------

    @invariant()
    def states_agree(self) -> None:
        ids = list(self.jobs)
        if not ids:
            return
        redis_states = self.queue.states_and_batches(ids)
        stored = self.store.get_many(ids)
        results = self.queue.results(ids)
        for job_id, (state, batch), res in zip(ids, redis_states, results, strict=True):
            j = self.jobs[job_id]
            assert state == (None if j.answered else j.state), (job_id, state, j)
            if j.state in ("SCHEDULED", "RUNNING"):
                assert batch == j.batch
            row = stored[job_id]
            if j.final is None:
                assert row.state.value not in FINAL, (job_id, row.state)
                assert res is None
            else:
                assert row.state.value == j.final
                assert res is not None and res.state.value == j.final
                assert row.result is not None and row.result.text == res.text == j.text

    @invariant()
    def the_outbox_holds_the_batches_not_started(self) -> None:
        """What a scheduler that takes over (or finds another Redis) sends again."""
        outbox = self.queue.outbox()
        assert set(outbox) == {b.id for b in self.batches.values() if not b.started}
        for batch_id, (meta, job_ids) in outbox.items():
            b = self.batches[batch_id]
            assert job_ids == b.jobs and json.loads(meta)["cls"] == b.cls

    @invariant()
    def no_job_in_two_batches(self) -> None:
        seen = Counter(i for b in self.batches.values() for i in b.jobs
                       if self.jobs[i].batch == b.id)
        assert not [i for i, n in seen.items() if n > 1]

    @invariant()
    def counters_balance(self) -> None:
        submitted: Counter[tuple[str, str]] = Counter()
        finished: Counter[tuple[str, str]] = Counter()
        for c in read_totals(self.r):
            if c.kind == "submitted":
                submitted[(c.cls, c.tenant)] += c.value
            elif c.kind == "finished":
                finished[(c.cls, c.tenant)] += c.value
        pending: Counter[tuple[str, str]] = Counter()
        for j in self.jobs.values():
            if j.final is None:
                pending[(class_name(str(j.cls)), j.tenant)] += 1
        for k in set(submitted) | set(finished) | set(pending):
            assert submitted[k] == finished[k] + pending[k], (k, submitted, finished, pending)

    @invariant()
    def pending_sets_match(self) -> None:
        for tenant in TENANTS:
            want = {j.id for j in self.jobs.values() if j.tenant == tenant and j.waiting
                    and j.final is None}
            got = set(self.r.smembers(keys.tenant_pending(tenant)))
            assert got == want, (tenant, got ^ want)


def test_the_protocol_against_its_model(settings: Settings) -> None:
    s = settings.model_copy(update={"reconcile_grace_s": 0.0, "result_ttl_s": TTL,
                                    "cache_enabled": True})
    run_state_machine_as_test(
        lambda: Protocol(s),  # type: ignore[arg-type]  # a factory is accepted
        settings=hsettings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                           suppress_health_check=list(HealthCheck)))

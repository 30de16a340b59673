"""Running one batch: skip what must not run, call the provider once, store each result.

Redis or the SQL store failing under a batch is not the batch's fault: each step that
talks to them is retried in place, with backoff, until they answer (within the task's
time limit), so a blip costs neither a second provider call nor a delivery counted
against the batch. Only a delivery that follows a lost worker counts toward poison
(``RedisQueue.start_run``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from jobs import cache, costs
from jobs.models import JobResult, JobSpec, JobState
from jobs.outcomes import record_results
from jobs.prices import PriceBook
from jobs.queue import RedisQueue
from jobs.store import JobStore
from workers import metrics
from workers.health import Health
from workers.providers import Provider, ProviderRequest
from workers.ratelimit import RateLimiter
from workers.retry import Outcome, ProviderCaller

log = logging.getLogger(__name__)

T = TypeVar("T")
#: What a worker tells the scheduler of a batch's end (``pb:events`` fields): ``done`` (the
#: batch id) with, after a provider call, its ``deployment``, ``size``, ``seconds`` and
#: ``replica``, and what its baselines learn (``BatchRunner._observed``); else ``ended``
#: (why no call's timing is given).
Event = dict[str, str | int | float]

#: Errors of Redis or the SQL store: retried in place, never held against the batch.
#: After a start that no replica acknowledged in time, starts do not wait for this long.
NO_REPLICA_PAUSE_S = 5.0

INFRA_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, SQLAlchemyError)
#: Longest pause between two tries of a step while Redis or SQL is down, in seconds.
STEADY_MAX_PAUSE_S = 5.0


@dataclass
class BatchRunner:
    """Runs batches for one worker process."""

    settings: Settings
    queue: RedisQueue
    store: JobStore
    provider_for: Callable[[str], Provider]
    caller: ProviderCaller | None = None
    #: Sends one isolated job of a poison batch: (poison batch id, new batch id, job id,
    #: class).
    resend: Callable[[str, str, str, int], None] | None = None
    #: The deployments' prices (default: the settings').
    prices: PriceBook | None = None
    #: Infrastructure errors waited out (for logs and tests).
    blips: int = 0
    _until: float = field(default=0.0, repr=False)
    _no_replica_until: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if self.prices is None:
            self.prices = PriceBook.for_settings(self.settings)
        if self.caller is None:
            self.caller = ProviderCaller(self.settings, self.provider_for,
                                 RateLimiter(self.queue.r, self.settings),
                                 Health(self.queue.r, self.settings))

    def steady(self, what: str, step: Callable[[], T]) -> T:
        """Run ``step``; while Redis or SQL fails, wait and try again (until the task's
        time is nearly up, then the error goes up)."""
        pause = 0.2
        while True:
            try:
                return step()
            except INFRA_ERRORS as exc:
                if time.monotonic() + pause >= self._until:
                    raise
                self.blips += 1
                log.warning("%s: %s; trying again in %.1f s", what, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, STEADY_MAX_PAUSE_S)

    def run(self, batch_id: str, send_id: str, job_ids: Sequence[str],
            similarity: float | None = None, cls: int = 2, prefix_hint: int = 0,
            retries: int = 0, estimate_s: float = 0.0,
            redelivered: bool = True, replicas: Sequence[int] | None = None,
            ) -> dict[str, Any]:
        """Run the batch; return a summary (for the worker's log: the task stores no
        result of its own; each job's result is stored under the job's id).

        ``retries``: the task's retry number (a retry asked for by the task itself is a
        new message, not a re-delivery after a lost worker). ``estimate_s``: the
        scheduler's estimate of the batch's time; a job whose deadline no longer leaves
        that much when the batch starts is expired instead of sent. ``redelivered``: the
        broker marked the message as delivered before (its worker was lost).
        ``replicas``: the order in which to try the provider's replicas (the scheduler's
        choice first, ``scheduler.routing``).

        Under Sentinel the start waits until a replica holds it (``redis_wait_replicas``,
        ``redis_wait_ms``), so that a failover cannot start the batch a second time; past
        the wait it goes ahead and is counted (a lagging replica must not stop the
        service), and a primary lost before the replica had it is an error like any other
        (the start is tried again on the new primary, with the same delivery token).
        """
        # Wait out outages until just before the task's soft time limit (time limit - 5 s).
        self._until = time.monotonic() + max(3.0, self.settings.task_time_limit_s - 6.0)
        ttl = self.settings.result_ttl_s
        token = uuid.uuid4().hex
        wait_for, wait_ms = self.settings.wait_replicas, self.settings.redis_wait_ms
        skip = wait_for > 0 and time.monotonic() < self._no_replica_until
        lost, held = self.steady("start", lambda: self.queue.start_run_replicated(
            batch_id, send_id, retries, ttl, cls, time.time(), token=token,
            redelivered=redelivered, replicas=0 if skip else wait_for, wait_ms=wait_ms))
        if skip or not held:
            metrics.UNREPLICATED_STARTS.inc()
        if not held:  # no replica (after a failover, until one joins): stop waiting a while
            self._no_replica_until = time.monotonic() + NO_REPLICA_PAUSE_S
            log.warning("batch %s: no replica acknowledged its start within %d ms; running it "
                        "anyway (and not waiting for %.0f s)", batch_id, wait_ms,
                        NO_REPLICA_PAUSE_S)
        if lost is None:
            log.info("batch %s: another send of this batch already ran; skipping", batch_id)
            metrics.BATCHES.labels(metrics.class_name(str(cls)), "duplicate").inc()
            return {"class": metrics.class_name(str(cls)), "size": len(job_ids),
                    "skipped": "duplicate send", "jobs": 0}
        retrying = False
        event: Event | None = None
        ended = "raised"  # how it ended, when no provider call's timing tells it
        if lost:
            log.warning("batch %s: delivered again after its worker was lost (%d time(s))",
                        batch_id, lost)
        try:
            if lost >= self.settings.max_deliveries:
                metrics.BATCHES.labels(metrics.class_name(str(cls)), "poison").inc()
                summary = self._poisoned(batch_id, job_ids, cls, lost)
                ended = "poison"
                return summary
            metrics.BATCHES.labels(metrics.class_name(str(cls)), "ran").inc()
            summary, event = self._run(batch_id, job_ids, similarity, prefix_hint,
                                       estimate_s, cls, replicas)
            ended = "nothing to run"
            return summary
        except INFRA_ERRORS:
            retrying = True  # the task runs the batch again: it stays in flight
            raise
        finally:
            # Every ending but a retry tells the scheduler, which then stops counting the
            # batch's work on its replica (a duplicate send returned above: the send that
            # runs tells it).
            if not retrying:
                self.batch_done(batch_id, cls, event or {"done": batch_id, "ended": ended})

    def batch_done(self, batch_id: str, cls: int, event: Event | None = None) -> None:
        """The batch is over: it leaves the scheduler's in-flight count, and ``event``
        tells the scheduler (the timing of its provider call when it made one, else how
        it ended: ``ended`` "nothing to run", "poison" or "raised")."""
        with contextlib.suppress(*INFRA_ERRORS):
            self.steady("done", lambda: self.queue.batch_done(batch_id, cls, event))

    def fail_running(self, batch_id: str, job_ids: Sequence[str], reason: str) -> int:
        """End the batch's jobs that are still running as FAILED (time limit reached)."""
        self._until = time.monotonic() + 30.0
        loaded = self.steady("load", lambda: self.queue.load_owned(job_ids))
        live = [spec for spec, state, owner in loaded
                if spec is not None and state == JobState.RUNNING and owner == batch_id]
        self._fail(live, reason, batch_id, len(job_ids))
        return len(live)

    def _fail(self, specs: list[JobSpec], reason: str, batch_id: str, size: int) -> None:
        self._record([JobResult(id=s.id, state=JobState.FAILED, error=reason,
                                created_at=s.created_at, provider=s.provider, model=s.model,
                                deadline=s.deadline, batch_id=batch_id, batch_size=size)
                      for s in specs], specs)

    def _poisoned(self, batch_id: str, job_ids: Sequence[str], cls: int,
                  crashes: int) -> dict[str, Any]:
        """The batch killed its worker ``crashes`` times: isolate its jobs, or fail the one.

        Isolated jobs move to batches of their own (counted in flight like any batch), so
        the old batch can no longer run them.
        """
        loaded = self.steady("load", lambda: self.queue.load_owned(job_ids))
        live = [spec for spec, state, owner in loaded if spec is not None and owner == batch_id
                and state in (JobState.SCHEDULED, JobState.RUNNING)]
        if len(live) > 1 and self.resend is not None:
            log.warning("batch %s killed its worker %d times: sending its %d jobs one by one",
                        batch_id, crashes, len(live))
            moves = [(spec.id, str(uuid.uuid4()), cls) for spec in live]
            moved = self.steady("reassign", lambda: self.queue.reassign(batch_id, moves,
                                                                        time.time()))
            for (job_id, new_id, job_cls), ok in zip(moves, moved, strict=True):
                if ok:
                    self.resend(batch_id, new_id, job_id, job_cls)
            return {"batch_id": batch_id, "split": [m[0] for m in moves], "jobs": 0}
        reason = (f"the job killed the worker {crashes} times (a poison job); it will not "
                  "be tried again")
        self._fail(live, reason, batch_id, len(job_ids))
        return {"batch_id": batch_id, "failed": len(live), "jobs": 0}

    def _run(self, batch_id: str, job_ids: Sequence[str], similarity: float | None,
             prefix_hint: int = 0, estimate_s: float = 0.0, cls: int = 2,
             replicas: Sequence[int] | None = None) -> tuple[dict[str, Any], Event | None]:
        """Run the batch's live jobs; return the summary, and the timing of the provider
        call for the scheduler (None when nothing was called)."""
        started = time.time()
        loaded, states = self.steady("load", lambda: self.queue.load_and_mark(batch_id,
                                                                              job_ids))
        runnable: list[JobSpec] = []
        expired: list[JobSpec] = []
        skipped = 0
        for spec, state in zip(loaded, states, strict=True):
            if spec is None or state != JobState.RUNNING:
                # cancelled, already final, in another batch, or unknown to Redis
                skipped += 1
            elif spec.deadline is not None and spec.deadline - started <= estimate_s:
                expired.append(spec)  # it could no longer finish in time
            else:
                runnable.append(spec)
        base: dict[str, Any] = {"batch_id": batch_id, "batch_size": len(job_ids),
                                "batch_similarity": similarity}
        if expired:
            self._record([JobResult(
                id=s.id, state=JobState.EXPIRED, created_at=s.created_at, provider=s.provider,
                model=s.model, finished_at=started, deadline=s.deadline,
                error=(f"deadline too close when the batch started ({s.deadline - started:.2f} "
                       f"s left, the batch takes about {estimate_s:.2f} s)"
                       if s.deadline is not None and s.deadline > started
                       else "deadline passed before the job could run"), **base)
                for s in expired], expired)
        by_id = {s.id: s for s in runnable}
        results: list[JobResult] = []

        def on_final(outcomes: dict[str, Outcome]) -> None:
            # Stored as soon as each is final: good answers do not wait for a poison.
            now = time.time()
            done = [_result(by_id[i], o, started, now, base) for i, o in outcomes.items()]
            self._record(done, [by_id[i] for i in outcomes])
            results.extend(done)

        if runnable:
            self._call(runnable, on_final, prefix_hint, replicas)
        finished = time.time()
        event: Event | None = None
        if runnable:
            provider, model = runnable[0].provider, runnable[0].model
            metrics.BATCH_SECONDS.labels(provider, model).observe(finished - started)
            metrics.BATCH_JOBS.labels(provider, model).observe(len(runnable))
            # An observation for the scheduler, sent with the batch's end (``run``).
            event = {"done": batch_id, "deployment": f"{provider}|{model}",
                     "size": len(runnable), "seconds": round(finished - started, 6)}
            if self.caller is not None and self.caller.replica is not None:
                event["replica"] = self.caller.replica  # the one that answered
            event.update(self._observed(runnable, results))
        # What Flower shows as the task's result (and the worker logs): counts, not ids.
        usage = [r.usage for r in results if r.usage is not None]
        summary = {"class": metrics.class_name(str(cls)), "size": len(job_ids),
                   "jobs": len(runnable),
                   "succeeded": sum(1 for r in results if r.state is JobState.SUCCEEDED),
                   "failed": sum(1 for r in results if r.state is JobState.FAILED),
                   "expired": len(expired), "skipped": skipped,
                   "prompt_tokens": sum(u.prompt_tokens for u in usage),
                   "cached_tokens": sum(u.cached_tokens for u in usage),
                   "seconds": round(finished - started, 3)}
        return summary, event

    def _observed(self, specs: list[JobSpec], results: list[JobResult]) -> Event:
        """What the scheduler's baselines learn from the batch, besides its time: the
        tokens of its answers, where it ran when a fallback answered, its requests per
        deployment and replica with the transient failures among them (``calls``: JSON
        ``[[deployment, replica index or -1, requests, failed], ...]``), and the median
        time to first token of its streamed jobs (``ttft``)."""
        usage = [r.usage for r in results if r.usage is not None and r.state is JobState.SUCCEEDED]
        out: Event = {"completion_tokens": sum(u.completion_tokens for u in usage),
                      "prompt_tokens": sum(u.prompt_tokens for u in usage),
                      "cached_tokens": sum(u.cached_tokens for u in usage)}
        caller = self.caller
        primary = f"{specs[0].provider}|{specs[0].model}"
        if caller is not None:
            if caller.answered is not None and caller.answered != primary:
                out["ran_on"] = caller.answered
            if caller.calls:
                out["calls"] = json.dumps([[dep, i, n, failed] for (dep, i), (n, failed)
                                           in caller.calls.items()])
        streamed = [s.id for s in specs if s.stream]
        sink = getattr(self.provider_for(specs[0].provider), "sink", None) if streamed else None
        if sink is not None:
            firsts = [t for t in (sink.first_token_s(j) for j in streamed) if t is not None]
            if firsts:
                out["ttft"] = round(statistics.median(firsts), 6)
        return out

    def _call(self, specs: list[JobSpec], on_final: Callable[[dict[str, Outcome]], None],
              prefix_hint: int, replicas: Sequence[int] | None = None) -> None:
        """Call the provider for the batch, in an order where shared prefixes travel
        together, through the one retry layer; ``on_final`` gets each outcome."""
        assert self.caller is not None
        order = sorted(specs, key=lambda s: s.text)
        requests = [ProviderRequest.from_spec(s, prefix_hint) for s in order]
        self.caller.call(requests, specs[0].provider, {s.id: s.tenant for s in specs},
                         on_final=on_final, replicas=replicas)

    def _copy_stored(self, job_ids: list[str], specs: dict[str, JobSpec]) -> None:
        """Jobs this run found already final in SQL: a re-delivered batch whose first
        worker died after its SQL write and before its Redis write. Their stored result
        goes to the result backend now (SET NX: a result there stays), instead of when the
        reconciler next passes."""
        have = self.queue.have_results(job_ids)
        missing = [j for j, h in zip(job_ids, have, strict=True) if not h]
        if not missing:
            return
        stored = self.store.get_many(missing)
        found = [(s.result, specs[j]) for j, s in stored.items() if s.result is not None]
        if found:
            record_results(self.store, self.queue, [r for r, _ in found],
                           [sp.tenant for _, sp in found],
                           result_ttl_s=self.settings.result_ttl_s,
                           classes=[int(sp.priority) for _, sp in found], in_sql=True,
                           prices=self.prices)
            log.info("copied %d results stored by a worker that died to the result backend",
                     len(found))

    def _record(self, results: list[JobResult], specs: list[JobSpec]) -> None:
        """The one path (``jobs.outcomes.record_results``): SQL first (it decides the
        first result), the exact cache, then the result backend and the rest; each step
        waits out a Redis or SQL outage, so the first write is never repeated in vain."""
        if not results:
            return
        results = [costs.priced(r, self.prices)[0] for r in results]  # before the JSON
        dumped = {r.id: r.model_dump_json() for r in results}  # for SQL and for Redis
        by_id = {s.id: s for s in specs}
        put = ((lambda mine: cache.put(self.queue, self.settings, mine, by_id))
               if self.settings.cache_enabled else None)
        won = record_results(self.store, self.queue, results, [by_id[r.id].tenant for r in results],
                             result_ttl_s=self.settings.result_ttl_s,
                             classes=[int(by_id[r.id].priority) for r in results],
                             dumped=dumped, before_publish=put, steady=self.steady,
                             prices=self.prices)
        lost = [r.id for r in results if r.id not in won]
        if lost:  # final in SQL already: a worker died between its two writes?
            self.steady("copy", lambda: self._copy_stored(lost, by_id))
        mine = [r for r in results if r.id in won]
        metrics.observe_results(mine, [int(by_id[r.id].priority) for r in mine])


def _result(spec: JobSpec, outcome: Outcome, started: float, finished: float,
            base: dict[str, Any]) -> JobResult:
    reply = outcome.reply
    state = JobState.SUCCEEDED if reply.ok else JobState.FAILED
    provider, model = outcome.deployment.split("|", 1)
    return JobResult(id=spec.id, state=state, text=reply.text, usage=reply.usage,
                     error=reply.error, provider=provider, model=model,
                     tool_calls=list(reply.tool_calls) if reply.tool_calls else None,
                     refusal=reply.refusal, finish_reason=reply.finish_reason,
                     logprobs=reply.logprobs, parsed=reply.parsed,
                     error_code=reply.error_code, schema_retries=outcome.schema_retries,
                     attempts=outcome.attempts, created_at=spec.created_at,
                     deadline=spec.deadline, started_at=started, finished_at=finished,
                     lane="fast", **base)

"""Running one batch: skip what must not run, call the provider once, store each result."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from config.settings import Settings
from jobs.models import JobResult, JobSpec, JobState
from jobs.outcomes import record_results
from jobs.queue import RedisQueue
from jobs.store import JobStore
from workers.providers import Provider, ProviderRequest
from workers.ratelimit import RateLimiter
from workers.retry import Caller, Health, Outcome

log = logging.getLogger(__name__)


@dataclass
class BatchRunner:
    """Runs batches for one worker process."""

    settings: Settings
    queue: RedisQueue
    store: JobStore
    provider_for: Callable[[str], Provider]
    caller: Caller | None = None
    #: Sends one job as its own batch task: (job id, class) -> None.
    resend: Callable[[str, int], None] | None = None

    def __post_init__(self) -> None:
        if self.caller is None:
            self.caller = Caller(self.settings, self.provider_for,
                                 RateLimiter(self.queue.r, self.settings),
                                 Health(self.queue.r, self.settings))

    def run(self, batch_id: str, send_id: str, job_ids: Sequence[str],
            similarity: float | None = None, cls: int = 2,
            prefix_hint: int = 0) -> dict[str, Any]:
        """Run the batch; return a summary (stored as the batch task's own result)."""
        if not self.queue.claim_run(batch_id, send_id, self.settings.result_ttl_s):
            log.info("batch %s: another send of this batch already ran; skipping", batch_id)
            return {"batch_id": batch_id, "skipped": "duplicate send", "jobs": 0}
        deliveries = self.queue.count_delivery(batch_id, self.settings.result_ttl_s)
        try:
            if deliveries > self.settings.max_deliveries:
                return self._poisoned(batch_id, job_ids, cls, deliveries - 1)
            return self._run(batch_id, job_ids, similarity, prefix_hint)
        finally:
            with contextlib.suppress(redis.RedisError):
                self.queue.batch_done(batch_id, cls)

    def fail_running(self, batch_id: str, job_ids: Sequence[str], reason: str) -> int:
        """End the batch's jobs that are still running as FAILED (time limit reached)."""
        loaded = self.queue.load(job_ids)
        live = [spec for spec, state in loaded if spec is not None and state == JobState.RUNNING]
        self._fail(live, reason, batch_id, len(job_ids))
        return len(live)

    def _fail(self, specs: list[JobSpec], reason: str, batch_id: str, size: int) -> None:
        self._record([JobResult(id=s.id, state=JobState.FAILED, error=reason,
                                created_at=s.created_at, provider=s.provider, model=s.model,
                                batch_id=batch_id, batch_size=size) for s in specs], specs)

    def _poisoned(self, batch_id: str, job_ids: Sequence[str], cls: int,
                  crashes: int) -> dict[str, Any]:
        """The batch killed its worker ``crashes`` times: isolate its jobs, or fail the one."""
        loaded = self.queue.load(job_ids)
        live = [spec for spec, state in loaded if spec is not None and state in (
            JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING)]
        if len(live) > 1 and self.resend is not None:
            log.warning("batch %s killed its worker %d times: sending its %d jobs one by one",
                        batch_id, crashes, len(live))
            for spec in live:
                self.resend(spec.id, cls)
            return {"batch_id": batch_id, "split": [s.id for s in live], "jobs": 0}
        reason = (f"the job killed the worker {crashes} times (a poison job); it will not "
                  "be tried again")
        self._fail(live, reason, batch_id, len(job_ids))
        return {"batch_id": batch_id, "failed": len(live), "jobs": 0}

    def _run(self, batch_id: str, job_ids: Sequence[str], similarity: float | None,
             prefix_hint: int = 0) -> dict[str, Any]:
        started = time.time()
        loaded = self.queue.load(job_ids)
        states = self.queue.mark_running(batch_id, job_ids)
        runnable: list[JobSpec] = []
        expired: list[JobSpec] = []
        skipped = 0
        for (spec, _), state in zip(loaded, states, strict=True):
            if spec is None or state != JobState.RUNNING:
                skipped += 1  # cancelled, already final, or unknown to Redis (reconciled)
            elif spec.deadline is not None and started >= spec.deadline:
                expired.append(spec)
            else:
                runnable.append(spec)
        base: dict[str, Any] = {"batch_id": batch_id, "batch_size": len(job_ids),
                                "batch_similarity": similarity}
        if expired:
            self._record([JobResult(id=s.id, state=JobState.EXPIRED, created_at=s.created_at,
                                    provider=s.provider, model=s.model, finished_at=started,
                                    error="deadline passed before the job could run", **base)
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
            self._call(runnable, on_final, prefix_hint)
        finished = time.time()
        if runnable:
            self.queue.post_event(done=batch_id, deployment=f"{runnable[0].provider}|"
                                  f"{runnable[0].model}", size=len(runnable),
                                  seconds=round(finished - started, 6))
        failed = sum(1 for r in results if r.state is JobState.FAILED)
        return {**base, "jobs": len(runnable), "failed": failed, "expired": len(expired),
                "skipped": skipped, "seconds": round(finished - started, 4),
                "ran": [s.id for s in runnable]}

    def _call(self, specs: list[JobSpec], on_final: Callable[[dict[str, Outcome]], None],
              prefix_hint: int) -> None:
        """Call the provider for the batch, in an order where shared prefixes travel
        together, through the one retry layer; ``on_final`` gets each outcome."""
        assert self.caller is not None
        order = sorted(specs, key=lambda s: s.text)
        requests = [ProviderRequest.from_spec(s, prefix_hint) for s in order]
        self.caller.call(requests, specs[0].provider, {s.id: s.tenant for s in specs},
                         on_final=on_final)

    def _record(self, results: list[JobResult], specs: list[JobSpec]) -> None:
        if results:
            record_results(self.store, self.queue, results, [s.tenant for s in specs],
                           result_ttl_s=self.settings.result_ttl_s)


def _result(spec: JobSpec, outcome: Outcome, started: float, finished: float,
            base: dict[str, Any]) -> JobResult:
    reply = outcome.reply
    state = JobState.SUCCEEDED if reply.ok else JobState.FAILED
    provider, model = outcome.deployment.split("|", 1)
    return JobResult(id=spec.id, state=state, text=reply.text, usage=reply.usage,
                     error=reply.error, provider=provider, model=model,
                     attempts=outcome.attempts, created_at=spec.created_at,
                     started_at=started, finished_at=finished, **base)

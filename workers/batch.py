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
from workers.providers import Provider, ProviderReply, ProviderRequest

log = logging.getLogger(__name__)


@dataclass
class BatchRunner:
    """Runs batches for one worker process."""

    settings: Settings
    queue: RedisQueue
    store: JobStore
    provider_for: Callable[[str], Provider]

    def run(self, batch_id: str, send_id: str, job_ids: Sequence[str],
            similarity: float | None = None, cls: int = 2) -> dict[str, Any]:
        """Run the batch; return a summary (stored as the batch task's own result)."""
        if not self.queue.claim_run(batch_id, send_id, self.settings.result_ttl_s):
            log.info("batch %s: another send of this batch already ran; skipping", batch_id)
            return {"batch_id": batch_id, "skipped": "duplicate send", "jobs": 0}
        try:
            return self._run(batch_id, job_ids, similarity)
        finally:
            with contextlib.suppress(redis.RedisError):
                self.queue.batch_done(batch_id, cls)

    def _run(self, batch_id: str, job_ids: Sequence[str],
             similarity: float | None) -> dict[str, Any]:
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
        replies = self._call(runnable) if runnable else []
        finished = time.time()
        results = [_result(spec, reply, started, finished, base)
                   for spec, reply in zip(runnable, replies, strict=True)]
        self._record(results, runnable)
        if runnable:
            self.queue.post_event(done=batch_id, deployment=f"{runnable[0].provider}|"
                                  f"{runnable[0].model}", size=len(runnable),
                                  seconds=round(finished - started, 6))
        failed = sum(1 for r in results if r.state is JobState.FAILED)
        return {**base, "jobs": len(runnable), "failed": failed, "expired": len(expired),
                "skipped": skipped, "seconds": round(finished - started, 4),
                "ran": [s.id for s in runnable]}

    def _call(self, specs: list[JobSpec]) -> list[ProviderReply]:
        """One provider call for the batch, in an order where shared prefixes travel together."""
        order = sorted(range(len(specs)), key=lambda i: specs[i].text)
        requests = [ProviderRequest.from_spec(specs[i]) for i in order]
        provider = self.provider_for(specs[0].provider)
        try:
            replies = provider.complete(requests)
        except Exception as exc:  # the provider's failure fails the batch's jobs, with the reason
            log.exception("provider %s failed a batch of %d", provider.name, len(requests))
            reason = f"provider {provider.name} failed: {type(exc).__name__}: {exc}"
            replies = [ProviderReply(job_id=r.job_id, error=reason) for r in requests]
        by_id = {r.job_id: r for r in replies}
        return [by_id.get(s.id) or ProviderReply(job_id=s.id, error="provider gave no reply")
                for s in specs]

    def _record(self, results: list[JobResult], specs: list[JobSpec]) -> None:
        if results:
            record_results(self.store, self.queue, results, [s.tenant for s in specs],
                           result_ttl_s=self.settings.result_ttl_s)


def _result(spec: JobSpec, reply: ProviderReply, started: float, finished: float,
            base: dict[str, Any]) -> JobResult:
    state = JobState.SUCCEEDED if reply.ok else JobState.FAILED
    return JobResult(id=spec.id, state=state, text=reply.text, usage=reply.usage,
                     error=reply.error, provider=spec.provider, model=spec.model,
                     created_at=spec.created_at, started_at=started, finished_at=finished, **base)

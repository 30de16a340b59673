"""The half-price lane on a worker: uploading a provider batch, polling it, recording its
results. The scheduler decides (which jobs, when to look again) and sends the tasks
``promptbatch.lane_submit`` and ``promptbatch.lane_poll``; this is their work, against
the provider's batch endpoint (``workers.providers.batch_api``).

**Uploading, once.** The scheduler recorded the provider batch (``creating``) and its
jobs (``AT_PROVIDER``) before the task was sent. An attempt takes the record
(``ProviderBatches.begin_attempt``: one at a time; a stale one is taken over). When an
earlier attempt began, the provider is first asked whether it holds a batch that attempt
created (OpenAI: our id in the batch's metadata; Anthropic: created since the record,
with the same number of requests, held by no other record): found, it is adopted, never
created again. Only then is the batch uploaded, and its id recorded (``submitted``) by
this attempt alone; an attempt that finds another recorded first cancels its own copy.

**Polling.** One status request per poll; the scheduler spaces the polls out. Once all
of a batch's jobs were cancelled, the provider is asked to cancel it.

**Results.** Each line goes through the one result path (``record_results``), by its
custom id (the job id), with ``lane: "provider_batch"``: an answer is checked against what
its job asked for (a JSON response format, tools) as on the fast path; a job's own error
fails it. A transient failure, an answer that does not validate, a request the provider
expired or cancelled, and a job without a line go back to the fast path (``lane:
"fast"``) while their deadline allows, else end EXPIRED.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from config.settings import Settings
from jobs import cache
from jobs.answers import check_answer, needs_check
from jobs.models import JobResult, JobSpec, JobState
from jobs.outcomes import record_results
from jobs.prices import PriceBook
from jobs.provider_batches import ProviderBatch, ProviderBatches, test_fault
from jobs.queue import RedisQueue
from jobs.store import JobStore
from workers import metrics
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.batch_api import BatchAPIError, BatchClient, LineResult, Upstream

log = logging.getLogger(__name__)

#: Results recorded per step.
CHUNK = 500


def batch_client(provider: str, settings: Settings) -> BatchClient:
    """The batch endpoint client of ``provider``."""
    if provider == "openai":
        from workers.providers.openai_batch import OpenAIBatch

        return OpenAIBatch(settings)
    if provider == "anthropic":
        from workers.providers.anthropic_batch import AnthropicBatch

        return AnthropicBatch(settings)
    raise ValueError(f"Unknown batch endpoint: {provider!r}; choose one of openai, anthropic")


@dataclass
class LaneRunner:
    """Uploads, polls and collects provider batches for one worker process."""

    settings: Settings
    queue: RedisQueue
    store: JobStore
    client_for: Callable[[str], BatchClient]
    #: Prices of the answers (each at its batch discount: the results say
    #: ``lane: "provider_batch"``).
    prices: PriceBook | None = None
    lanes: ProviderBatches = field(init=False)

    def __post_init__(self) -> None:
        self.lanes = ProviderBatches(self.store)
        if self.prices is None:
            self.prices = PriceBook.for_settings(self.settings)

    # --- uploading --------------------------------------------------------------------

    def submit(self, batch_id: str) -> dict[str, Any]:
        """Create the provider batch ``batch_id`` at its provider, once."""
        now = time.time()
        token = uuid.uuid4().hex
        before = self.lanes.begin_attempt(batch_id, token, now,
                                          self.settings.batch_api_submit_retry_s)
        if before is None:
            return {"batch_id": batch_id, "skipped": "created, closed, or another attempt "
                    "is under way"}
        client = self.client_for(before.provider)
        try:
            if before.attempt_at is not None:  # an earlier attempt may have created it
                found = self._adopt(before, client, token, now)
                if found is not None:
                    return found
            return self._create(before, client, token, now)
        except BatchAPIError as exc:
            if exc.transient:
                log.warning("provider batch %s: %s; trying again later", batch_id, exc)
                self.lanes.attempt_over(batch_id, token, now + self._retry_in(exc), str(exc))
                return {"batch_id": batch_id, "retry": str(exc)}
            log.error("provider batch %s refused: %s; its jobs take the fast path",
                      batch_id, exc)
            self._unfinished(before, self.lanes.waiting(batch_id), f"the provider refused the "
                             f"batch ({exc})", time.time())
            self._close(before.id, f"refused: {exc}")
            return {"batch_id": batch_id, "refused": str(exc)}

    def _retry_in(self, exc: BatchAPIError) -> float:
        return max(exc.retry_after or 0.0, self.settings.batch_api_poll_min_s)

    def _adopt(self, rec: ProviderBatch, client: BatchClient, token: str,
               now: float) -> dict[str, Any] | None:
        """Record the batch an earlier attempt created, if the provider holds one."""
        known = self.lanes.known_ids(rec.deployment)
        found = [c for c in client.find(rec.id, rec.jobs, rec.created_at) if c not in known]
        if not found:
            return None
        provider_id = found[-1]  # the oldest candidate: the first attempt's
        if self.lanes.submitted(rec.id, token, provider_id, now,
                                now + self.settings.batch_api_poll_min_s):
            log.warning("provider batch %s: found %s, created by an attempt that did not "
                        "record it; not created again", rec.id, provider_id)
            return {"batch_id": rec.id, "adopted": provider_id}
        return {"batch_id": rec.id, "skipped": "recorded by another attempt"}

    def _create(self, rec: ProviderBatch, client: BatchClient, token: str,
                now: float) -> dict[str, Any]:
        specs = self._members(rec, now)
        if not specs:
            self._close(rec.id, None)
            return {"batch_id": rec.id, "jobs": 0}
        reuse = rec.input_file_id if rec.jobs == len(specs) else None
        self.lanes.sending(rec.id, token, len(specs))
        requests = [ProviderRequest.from_spec(s) for s in specs]
        provider_id = client.create(rec.id, requests, input_file_id=reuse,
                                    on_file=lambda f: self.lanes.uploaded(rec.id, token, f))
        test_fault(self.settings.batch_api_test_fault, "after_create")
        at = time.time()
        if not self.lanes.submitted(rec.id, token, provider_id, at,
                                    at + self.settings.batch_api_poll_min_s):
            latest = self.lanes.get(rec.id)
            if latest is None or latest.provider_batch_id != provider_id:
                log.warning("provider batch %s: another attempt recorded it first; "
                            "cancelling this attempt's copy %s", rec.id, provider_id)
                client.cancel(provider_id)
            return {"batch_id": rec.id, "skipped": "recorded by another attempt"}
        test_fault(self.settings.batch_api_test_fault, "after_record")
        log.info("provider batch %s: %d jobs sent to %s as %s", rec.id, len(specs),
                 rec.deployment, provider_id)
        return {"batch_id": rec.id, "jobs": len(specs), "provider_batch_id": provider_id}

    def _members(self, rec: ProviderBatch, now: float) -> list[JobSpec]:
        """The jobs to send: those the store holds at the provider in this batch and Redis
        holds there too (or not at all: Redis lost them). A job Redis holds elsewhere (the
        reconciler put it back before the batch was recorded) leaves the batch in the
        store; a job whose deadline passed ends EXPIRED (never sent after it)."""
        specs = self.lanes.waiting(rec.id)
        found = self.queue.states_and_batches([s.id for s in specs])
        mine: list[JobSpec] = []
        elsewhere: list[JobSpec] = []
        for spec, (state, owner) in zip(specs, found, strict=True):
            if state is None or (state == JobState.AT_PROVIDER.value and owner == rec.id):
                mine.append(spec)
            else:
                elsewhere.append(spec)
        if elsewhere:
            self.lanes.return_jobs(rec.id, [_fast(s) for s in elsewhere])
        late = [s for s in mine if s.deadline is not None and s.deadline <= now]
        if late:
            self._expire(rec, late, "deadline passed before the provider batch was sent", now)
        return [s for s in mine if s.deadline is None or s.deadline > now]

    # --- polling and results -------------------------------------------------------------

    def poll(self, batch_id: str) -> dict[str, Any]:
        """Ask the provider about the batch; record its results once it ended."""
        rec = self.lanes.get(batch_id)
        if rec is None or rec.state not in ("submitted", "ended") or not rec.provider_batch_id:
            return {"batch_id": batch_id, "skipped": "not at a provider"}
        client = self.client_for(rec.provider)
        now = time.time()
        try:
            left = self.lanes.waiting_count(batch_id)
            if left == 0 and rec.cancel_at is None and rec.state == "submitted":
                client.cancel(rec.provider_batch_id)  # every job of it was cancelled
                self.lanes.cancelling(batch_id, now)
                log.info("provider batch %s: all its jobs were cancelled; cancelled at the "
                         "provider", batch_id)
            found = client.status(rec.provider_batch_id)
            self.lanes.polled(batch_id, found.status, found.counts, ended=found.ended,
                              now=now)
            if not found.ended:
                return {"batch_id": batch_id, "status": found.status}
            summary = self._collect(rec, client, found)
        except BatchAPIError as exc:
            if exc.status == 404:  # the provider no longer has it (deleted there)
                log.error("provider batch %s: %s; its jobs take the fast path", batch_id, exc)
                self._unfinished(rec, self.lanes.waiting(batch_id),
                                 f"the provider lost the batch ({exc})", time.time())
                self._close(batch_id, f"lost at the provider: {exc}")
                return {"batch_id": batch_id, "lost": str(exc)}
            log.warning("provider batch %s: %s; polling again later", batch_id, exc)
            return {"batch_id": batch_id, "retry": str(exc)}
        self._close(batch_id, found.failure)
        return summary

    def _collect(self, rec: ProviderBatch, client: BatchClient,
                 found: Upstream) -> dict[str, Any]:
        """Record every line of an ended batch; what has none goes back or expires."""
        specs = {s.id: s for s in self.lanes.waiting(rec.id)}
        counts = {"succeeded": 0, "failed": 0, "fast": 0, "expired": 0, "not_ours": 0}
        if not specs:
            return {"batch_id": rec.id, **counts}
        requests = {i: ProviderRequest.from_spec(s) for i, s in specs.items()}
        seen: set[str] = set()
        again: list[tuple[JobSpec, str]] = []
        lines = client.results(found, requests) if found.failure is None else iter(())
        chunk: list[LineResult] = []
        for line in lines:
            if line.job_id not in specs or line.job_id in seen:
                counts["not_ours"] += 1
                continue
            seen.add(line.job_id)
            chunk.append(line)
            if len(chunk) >= CHUNK:
                again += self._record_lines(rec, chunk, specs, counts)
                chunk = []
        again += self._record_lines(rec, chunk, specs, counts)
        why = found.failure or f"no result in the provider batch ({found.status})"
        again += [(s, why) for i, s in specs.items() if i not in seen]
        if again:
            sent, expired = self._unfinished(rec, [s for s, _ in again],
                                             "; ".join(sorted({w for _, w in again}))[:500],
                                             time.time())
            counts["fast"] += sent
            counts["expired"] += expired
        if counts["not_ours"] and not seen:
            log.error("provider batch %s: none of the results of %s are its jobs'; they take "
                      "the fast path", rec.id, found.id)
        log.info("provider batch %s ended (%s): %s", rec.id, found.status, counts)
        return {"batch_id": rec.id, "status": found.status, **counts}

    def _record_lines(self, rec: ProviderBatch, lines: Sequence[LineResult],
                      specs: dict[str, JobSpec], counts: dict[str, int],
                      ) -> list[tuple[JobSpec, str]]:
        """Record the final outcomes of ``lines``; return the jobs to run again, and why."""
        now = time.time()
        results: list[JobResult] = []
        again: list[tuple[JobSpec, str]] = []
        for line in lines:
            spec = specs[line.job_id]
            if line.again or line.reply is None:
                again.append((spec, line.why or "no answer"))
                continue
            reply, retries = line.reply, None
            if reply.ok and needs_check(spec.response_format, spec.tools):
                checked = check_answer(reply.text, reply.tool_calls, reply.refusal,
                                       response_format=spec.response_format,
                                       tools=spec.tools, tool_choice=spec.tool_choice)
                if not checked.ok:
                    metrics.INVALID_OUTPUTS.labels(spec.provider, spec.model, "retried").inc()
                    again.append((spec, f"the answer did not validate ({checked.problem})"))
                    continue
                reply, retries = _parsed(reply, checked.parsed), 0
            results.append(self._result(rec, spec, reply, retries, now))
            counts["succeeded" if reply.ok else "failed"] += 1
        self._record(results, [specs[r.id] for r in results])
        return again

    def _result(self, rec: ProviderBatch, spec: JobSpec, reply: ProviderReply,
                retries: int | None, now: float) -> JobResult:
        return JobResult(
            id=spec.id, state=JobState.SUCCEEDED if reply.ok else JobState.FAILED,
            text=reply.text, usage=reply.usage, error=reply.error, provider=spec.provider,
            model=spec.model, tool_calls=list(reply.tool_calls) if reply.tool_calls else None,
            refusal=reply.refusal, finish_reason=reply.finish_reason, logprobs=reply.logprobs,
            parsed=reply.parsed, schema_retries=retries, attempts=1, batch_id=rec.id,
            batch_size=rec.jobs, created_at=spec.created_at, deadline=spec.deadline,
            started_at=rec.submitted_at, finished_at=now, lane="provider_batch")

    # --- what has no answer ------------------------------------------------------------------

    def _unfinished(self, rec: ProviderBatch, specs: Sequence[JobSpec], why: str,
                    now: float) -> tuple[int, int]:
        """Jobs of the batch without a final outcome: to the fast path while their
        deadline allows, else EXPIRED; how many went each way."""
        late = [s for s in specs if s.deadline is not None and s.deadline <= now]
        live = [_fast(s) for s in specs if s.deadline is None or s.deadline > now]
        moved = self.lanes.return_jobs(rec.id, live)
        if moved:
            chosen = set(moved)
            self.queue.lane_return(rec.id, [s for s in live if s.id in chosen])
            log.info("provider batch %s: %d jobs take the fast path (%s)", rec.id,
                     len(moved), why)
        if late:
            self._expire(rec, late, f"deadline passed at the provider ({why})", now)
        return len(moved), len(late)

    def _expire(self, rec: ProviderBatch, specs: Sequence[JobSpec], why: str,
                now: float) -> None:
        self._record([JobResult(id=s.id, state=JobState.EXPIRED, created_at=s.created_at,
                                finished_at=now, deadline=s.deadline, provider=s.provider,
                                model=s.model, batch_id=rec.id, error=why,
                                lane="provider_batch") for s in specs], list(specs))

    def _record(self, results: list[JobResult], specs: list[JobSpec]) -> None:
        """The one result path, with the exact cache as on the fast path."""
        if not results:
            return
        by_id = {s.id: s for s in specs}
        put = ((lambda mine: cache.put(self.queue, self.settings, mine, by_id))
               if self.settings.cache_enabled else None)
        won = record_results(self.store, self.queue, results,
                             [by_id[r.id].tenant for r in results],
                             result_ttl_s=self.settings.result_ttl_s,
                             classes=[int(by_id[r.id].priority) for r in results],
                             before_publish=put, prices=self.prices)
        mine = [r for r in results if r.id in won]
        metrics.observe_results(mine, [int(by_id[r.id].priority) for r in mine])

    def _close(self, batch_id: str, error: str | None) -> None:
        self.lanes.close(batch_id, time.time(), error)
        self.queue.lane_closed(batch_id)


def _fast(spec: JobSpec) -> JobSpec:
    """The job as it runs on the fast path from now on."""
    return spec.model_copy(update={"lane": "fast"})


def _parsed(reply: ProviderReply, parsed: Any) -> ProviderReply:
    import dataclasses

    return dataclasses.replace(reply, parsed=parsed)

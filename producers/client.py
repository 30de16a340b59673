"""The Python client: submit prompts, wait for results, check status, cancel.

A submit is all or nothing: every job is validated first (an ``InvalidJob`` names the
field and the position, and nothing is written), then stored and enqueued by the submit
engine the HTTP API uses too (``producers.submitting.Submitter``, whose docstring says
what happens when Redis or SQL fails half way).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from jobs import gcpause, streams
from jobs.errors import (
    InvalidJob,
    JobNotFound,
    ResultTimeout,
)
from jobs.models import JobRequest, JobResult, JobSpec, JobState
from jobs.outcomes import record_results
from jobs.queue import RedisQueue, connect
from jobs.store import JobStore
from producers.submitting import Submitter

#: Redis states a cancel ends CANCELLED: not started (staged by a submit under way, in
#: intake, waiting for an identical job, in a batch not yet started, waiting at a
#: provider's batch endpoint), a submit's withdrawn job (it never runs), cancelled
#: already, or unknown to Redis.
_CANCELLABLE = frozenset({"STAGED", "QUEUED", "FOLLOWING", "SCHEDULED", "AT_PROVIDER",
                          "WITHDRAWN", "CANCELLED", ""})


def _sweep_every(pending: int) -> float:
    """Seconds between two reads of every pending result (a safety net: results come
    through the stream of stored ids): once a second, longer for very many."""
    return max(1.0, pending * 20e-6)


class Client:
    """A connection to promptbatch's Redis and SQL store."""

    def __init__(self, settings: Settings | None = None, *, redis_url: str | None = None,
                 store: JobStore | None = None, fail_fast: bool = False) -> None:
        self.settings = settings or Settings()
        url = redis_url or self.settings.redis_url
        if not url:
            raise ValueError("redis_url is empty: set PROMPTBATCH_REDIS_URL or pass redis_url")
        if fail_fast:
            t = self.settings.api_dependency_timeout_s
            self.r = connect(url, socket_timeout=t, connect_timeout=t, fail_fast=True)
        else:
            self.r = connect(url)
        self.queue = RedisQueue(self.r)
        self.store = store or JobStore.for_settings(self.settings)
        #: The submit engine (shared with the HTTP API).
        self.submitter = Submitter(self.settings, self.queue, self.store)

    def check(self) -> None:
        """Check, once, that the store's schema is current and that it is the store the
        services on this Redis use (``SchemaBehind``, ``StoreMismatch``)."""
        self.submitter.check()

    def close(self) -> None:
        """Close the connections."""
        self.r.close()
        self.store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- submitting ---------------------------------------------------------------------

    def submit(self, prompt: str | None = None, **fields: Any) -> str:
        """Submit one job; return its id. Fields as in ``JobRequest`` (``messages`` with
        content parts and tool calls, ``tools``, ``response_format``..., as dictionaries
        or our types: ``Message``, ``Tool``, ``ResponseFormat``); ``response_format`` may
        also be a pydantic model class (a ``json_schema`` format of its schema)."""
        if prompt is not None:
            fields["prompt"] = prompt
        try:
            return self.submit_many([fields])[0]
        except InvalidJob as exc:  # one job: no line to name
            if exc.line is None:
                raise
            raise exc.without_line() from None

    def submit_many(self, items: Iterable[JobRequest | Mapping[str, Any]], *,
                    tenant: str | None = None) -> list[str]:
        """Submit many jobs, all or nothing; return their ids in input order.

        Every job is validated before anything is written: an invalid job raises
        ``InvalidJob`` (its ``line`` is the 1-based position) and nothing is submitted.
        """
        return [job_id for job_id, _ in self.submit_many_states(items, tenant=tenant)]

    def submit_many_states(self, items: Iterable[JobRequest | Mapping[str, Any]], *,
                           tenant: str | None = None) -> list[tuple[str, JobState]]:
        """``submit_many``, with each job's state (SUCCEEDED when the cache answered it)."""
        with gcpause.paused():
            return self.submitter.submit_requests(items, tenant)

    def submit_specs(self, specs: Sequence[JobSpec]) -> list[str]:
        """Store and enqueue resolved jobs, all or nothing; return their ids (an
        idempotent repeat maps to the id stored first)."""
        return self.submitter.submit_specs(specs)

    def submit_specs_states(self, specs: Sequence[JobSpec]) -> list[tuple[str, JobState]]:
        """``submit_specs``, with each job's state: SUCCEEDED for the ones the cache
        answered, QUEUED for the others (and for idempotent repeats)."""
        return self.submitter.submit_specs_states(specs)

    def check_quota(self, specs: Sequence[JobSpec]) -> None:
        """Raise ``TenantQuotaExceeded`` if the jobs would take a tenant over its quota."""
        self.submitter.check_quota(specs)

    # --- reading ------------------------------------------------------------------------

    def stream(self, job_id: str, after: str = "0-0", timeout: float | None = None,
               ) -> Iterator[streams.Event]:
        """A streaming job's events as the provider produces them: ``chunk`` (text),
        ``attempt`` (a new provider attempt: discard the text before it), ``lost`` (this
        reader fell behind; the whole text is in the result) and a last ``end`` (the final
        state, within half a second of the result being stored, whatever ended the job).
        ``after``: an event id to resume after. With ``timeout`` (seconds), a last
        ``timeout`` event instead once that long has passed and the stream is quiet (the
        job keeps running). A job whose result has left Redis ends at once with the state
        the store holds. ``jobs.streams.text_of`` joins the chunks of the last attempt."""
        until = None if timeout is None else time.time() + timeout

        def settled() -> str | None:
            try:
                raw = self.store.outcomes([job_id]).get(job_id)
            except SQLAlchemyError:  # the store is down: Redis may still end the stream
                return None
            return JobResult.model_validate_json(raw).state.value if raw else None

        yield from streams.follow(self.r, job_id, after, until=until, settled=settled)

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for a job's final result; ``ResultTimeout`` after ``timeout`` seconds."""
        for res in self.results([job_id], timeout=timeout):
            return res
        raise ResultTimeout(f"job {job_id} did not finish within {timeout} s")

    def results(self, job_ids: Sequence[str], timeout: float | None = None,
                ) -> Iterator[JobResult]:
        """Yield the jobs' final results as they finish (any order).

        Waits on the stream of stored result ids (``pb:done``) and reads only the results
        of its own jobs that it names; every pending result is read again at most once a
        second (``_sweep_every``), for results stored without an entry there or entries
        already trimmed away. Raises ``ResultTimeout`` if some are still unfinished after
        ``timeout`` seconds.
        """
        self.check()
        pending = dict.fromkeys(job_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = self.queue.done_cursor()  # before the first read: nothing stored is missed
        checked_sql = False
        next_sweep = 0.0
        while pending:
            found: list[JobResult] = []
            if time.monotonic() >= next_sweep:
                ids = list(pending)
                found = self._stored(ids)
                if not found and not checked_sql:
                    # Results that left Redis (expired, or Redis lost them) are in SQL.
                    checked_sql = True
                    stored = self.store.outcomes(ids)
                    found = [JobResult.model_validate_json(raw) for raw in stored.values()
                             if raw is not None]
                    missing = set(ids) - stored.keys()
                    if missing:
                        raise JobNotFound(sorted(missing)[0])
                next_sweep = time.monotonic() + _sweep_every(len(pending))
            for r in found:
                pending.pop(r.id, None)
            yield from found
            if not pending:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise ResultTimeout(f"{len(pending)} jobs did not finish within {timeout} s")
            wait = min(next_sweep, deadline if deadline is not None else next_sweep) - now
            cursor, done = self.queue.wait_done(cursor, max(1, min(100, int(wait * 1000))))
            for got in self._stored([j for j in dict.fromkeys(done) if j in pending]):
                if got.id in pending:
                    del pending[got.id]
                    yield got

    def _stored(self, job_ids: Sequence[str]) -> list[JobResult]:
        """The results the result backend holds of these jobs, read 2,000 at a time."""
        out: list[JobResult] = []
        for start in range(0, len(job_ids), 2000):
            out += [r for r in self.queue.results(job_ids[start:start + 2000]) if r]
        return out

    def status(self, job_id: str, tenant: str | None = None) -> JobState:
        """The job's current state (``job_id``: its id, or your own ``client_id``)."""
        stored = self.store.find(job_id, tenant)
        if stored is None:
            raise JobNotFound(job_id)
        if stored.state.final:
            return stored.state
        state = self.queue.states([stored.spec.id])[0]
        return JobState(state) if state and state in JobState.__members__ else stored.state

    def cancel(self, job_id: str, tenant: str | None = None) -> JobState:
        """Cancel a job that has not started; return the state it ends up in.

        A job already running or finished keeps its state (returned as it is).
        """
        stored = self.store.get(job_id, tenant)
        if stored is None:
            raise JobNotFound(job_id)
        if stored.state.final:
            return stored.state
        found = self.queue.cancel(job_id)
        if found in _CANCELLABLE:
            spec = stored.spec
            won = record_results(self.store, self.queue, [JobResult(
                id=job_id, state=JobState.CANCELLED, created_at=spec.created_at,
                provider=spec.provider, model=spec.model, error="cancelled by the caller")],
                [spec.tenant], result_ttl_s=self.settings.result_ttl_s,
                classes=[int(spec.priority)])
            if job_id in won:
                return JobState.CANCELLED
            return self.status(job_id)
        return JobState(found) if found in JobState.__members__ else self.status(job_id)

    def cancel_many(self, job_ids: Sequence[str], tenant: str | None = None,
                    ) -> dict[str, JobState]:
        """``cancel`` of many jobs (of ``tenant``'s, when given), in a few round trips:
        the state each known job ends up in."""
        stored = [s for s in self.store.get_many(job_ids).values()
                  if tenant is None or s.spec.tenant == tenant]
        out = {s.spec.id: s.state for s in stored}
        live = [s.spec for s in stored if not s.state.final]
        found = self.queue.cancel_many([s.id for s in live])
        ending = [spec for spec, state in zip(live, found, strict=True)
                  if state in _CANCELLABLE]
        for spec, state in zip(live, found, strict=True):
            if state in JobState.__members__:
                out[spec.id] = JobState(state)
        won = record_results(self.store, self.queue, [JobResult(
            id=s.id, state=JobState.CANCELLED, created_at=s.created_at, provider=s.provider,
            model=s.model, error="cancelled by the caller") for s in ending],
            [s.tenant for s in ending], result_ttl_s=self.settings.result_ttl_s,
            classes=[int(s.priority) for s in ending]) if ending else set()
        out.update(dict.fromkeys(won, JobState.CANCELLED))
        return out

    def spec(self, job_id: str, tenant: str | None = None) -> JobSpec:
        """The accepted job as stored."""
        stored = self.store.get(job_id, tenant)
        if stored is None:
            raise JobNotFound(job_id)
        return stored.spec


__all__ = ["Client", "InvalidJob"]

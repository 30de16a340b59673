"""The submit engine the Python ``Client`` and the HTTP API share.

A submit is all or nothing. The jobs arrive validated and resolved (``jobs.validation``:
an ``InvalidJob`` names the field and the position, and nothing is written); the
tenants' quotas are checked for the whole call; then the jobs are written to the SQL
store, staged in Redis (written and counted against the quotas, invisible to the
scheduler; a quota refusal there writes nothing), and published into intake,
``PUBLISH_CHUNK`` jobs per atomic step (a call of at most ``STAGE_CHUNK`` jobs none of
which may follow an identical one: one step). A job the exact cache answers is stored
final at once (``jobs.outcomes.record_results``). Should Redis refuse or fail, what was
written is withdrawn from Redis (a tombstone stops a late copy of the submit) and removed
from SQL, and nothing runs. Only when Redis stops answering and the withdrawal cannot
reach it either does the submit raise ``SubmitUnconfirmed`` with the job ids: they are in
SQL, and the reconciler finishes them (publishing what was staged, enqueueing what Redis
lacks, CANCELLED what was withdrawn).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis

from config.settings import Settings
from jobs import cache, costs, ledger
from jobs.errors import (
    BudgetExceeded,
    IdempotencyConflict,
    InvalidJob,
    ServiceUnavailable,
    SubmitUnconfirmed,
    TenantQuotaExceeded,
)
from jobs.ids import new_id
from jobs.models import JobRequest, JobResult, JobSpec, JobState
from jobs.outcomes import record_results
from jobs.prices import PriceBook
from jobs.queue import RedisQueue
from jobs.store import JobStore, OperationalError
from jobs.validation import parse_request, resolve

#: Jobs staged per atomic Redis step.
STAGE_CHUNK = 1000
#: Jobs published into intake per atomic Redis step (an API request's jobs: one step).
PUBLISH_CHUNK = 10_000


class Submitter:
    """Stores and enqueues resolved jobs (``submit_specs``), all or nothing."""

    def __init__(self, settings: Settings, queue: RedisQueue, store: JobStore,
                 prices: PriceBook | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.prices = prices if prices is not None else PriceBook.for_settings(settings)
        self._bound = False
        #: What else refuses a resolved job, by field (the HTTP API refuses jobs for a
        #: deployment it cannot call); None: nothing.
        self.vet: Callable[[JobSpec], list[tuple[str, str]]] | None = None

    def submit_requests(self, items: Iterable[JobRequest | Mapping[str, Any]],
                        tenant: str | None = None, *,
                        api_key: str | None = None) -> list[tuple[str, JobState]]:
        """Validate every request (``InvalidJob`` names the field and the 1-based
        position; nothing is written), resolve them into jobs, and submit them: each
        job's id and state (SUCCEEDED for the ones the cache answered). ``api_key``: the
        prefix of the API key that submits them (its budget applies)."""
        specs: list[JobSpec] = []
        now = time.time()
        for pos, item in enumerate(items, start=1):
            request = parse_request(item, line=pos)
            # A microsecond apart: jobs of one call keep their input order in listings.
            spec = resolve(request, job_id=new_id(), now=now + pos * 1e-6,
                           settings=self.settings, tenant=tenant, line=pos)
            self.vetted(spec, pos)
            specs.append(spec)
        return self.submit_specs_states(specs, api_key=api_key) if specs else []

    def vetted(self, spec: JobSpec, line: int | None = None) -> JobSpec:
        """``spec``, unless ``vet`` refuses it (``InvalidJob`` naming the field and line)."""
        errors = self.vet(spec) if self.vet is not None else []
        if errors:
            raise InvalidJob(errors, line=line)
        return spec

    def check(self) -> None:
        """Check, once, that the store's schema is current and that it is the store the
        services on this Redis use (``SchemaBehind``, ``StoreMismatch``), so that a client
        pointed at another store refuses instead of waiting for results forever."""
        if self._bound:
            return
        try:
            self.store.check_schema()
            self.queue.bind_store(self.store.store_id(), self.store.where)
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis is unavailable ({exc}); try again") from exc
        except OperationalError as exc:
            raise ServiceUnavailable(f"the job store is unavailable ({exc}); try again"
                                     ) from exc
        self._bound = True

    def submit_specs(self, specs: Sequence[JobSpec]) -> list[str]:
        """Store and enqueue resolved jobs, all or nothing; return their ids (an
        idempotent repeat maps to the id stored first)."""
        return [job_id for job_id, _ in self.submit_specs_states(specs)]

    def submit_specs_states(self, specs: Sequence[JobSpec], *,
                            api_key: str | None = None) -> list[tuple[str, JobState]]:
        """``submit_specs``, with each job's state: SUCCEEDED for the ones the cache
        answered, QUEUED for the others (and for idempotent repeats). The estimated cost
        of the others is reserved against their tenants' budgets and ``api_key``'s, in
        the transaction that stores them (``BudgetExceeded``: nothing is submitted)."""
        self.check()
        hits, keyed = self._lookup(specs)
        answered = {s.id: cache.hit_result(s, hits[s.id], time.time(), prices=self.prices)
                    for s in specs if s.id in hits}
        self.check_quota([s for s in specs if s.id not in hits])
        dumped = {job_id: res.model_dump_json() for job_id, res in answered.items()}
        spec_json = {s.id: s.model_dump_json() for s in specs}  # for SQL and Redis
        entries = ledger.entries_of((r, costs.charge(r, self.prices))
                                    for r in answered.values())
        try:  # a job the cache answered is stored already ended
            stored = self.store.insert(specs, final=answered, dumped=dumped,
                                       spec_json=spec_json, api_key=api_key,
                                       holds=self._holds(s for s in specs if s.id not in hits),
                                       entries=entries)
        except (IdempotencyConflict, BudgetExceeded):
            raise
        except Exception as exc:  # SQLAlchemy errors of any kind: the store is unusable
            raise ServiceUnavailable(f"the job store refused the jobs: {exc}") from exc
        fresh = [s for s in specs if stored[s.id] == s.id]
        done = [s for s in fresh if s.id in answered]
        if done:
            self._answer(done, answered, dumped)
        rest = [s for s in fresh if s.id not in answered]
        if rest:
            self._enqueue(rest, keyed, spec_json)
        return [(stored[s.id], JobState.SUCCEEDED if stored[s.id] in answered
                 else JobState.QUEUED) for s in specs]

    def _holds(self, specs: Iterable[JobSpec]) -> dict[str, float]:
        """Each job's estimated cost, to reserve against budgets (jobs without a price,
        or free, reserve nothing)."""
        out = {}
        default = self.settings.budget_output_tokens
        for s in specs:
            est = costs.estimate_cost(s, self.prices.price(s.provider, s.model), default)
            if est:
                out[s.id] = est
        return out

    def _lookup(self, specs: Sequence[JobSpec]) -> tuple[dict[str, cache.Entry], dict[str, str]]:
        """The cache's answers by job id, and the keys of the cacheable jobs that missed
        (they may follow an identical job)."""
        if not self.settings.cache_enabled:
            return {}, {}
        try:
            return cache.lookup(self.queue, specs, self.settings)
        except redis.RedisError:
            return {}, {}  # the cache is an optimisation: submit as usual

    def _answer(self, done: list[JobSpec], answered: dict[str, JobResult],
                dumped: dict[str, str] | None = None) -> None:
        """Publish the answers of jobs the cache answered (their rows are final already);
        should Redis fail here, the reconciler copies them from the store."""
        with contextlib.suppress(redis.RedisError):
            record_results(self.store, self.queue, [answered[s.id] for s in done],
                           [s.tenant for s in done], result_ttl_s=self.settings.result_ttl_s,
                           classes=[int(s.priority) for s in done], dumped=dumped,
                           in_sql=True, submitted=True, hit="exact", prices=self.prices)

    def _enqueue(self, fresh: list[JobSpec], keyed: dict[str, str] | None = None,
                 spec_json: dict[str, str] | None = None) -> None:
        """Stage every job, then publish them (a cacheable job that finds an identical one
        pending or running follows it instead; jobs that fit one step and may follow
        nobody are staged and published in that step); undo everything on any failure."""
        ttl, limit = self.settings.payload_ttl_s, self.settings.max_pending_per_tenant
        staged = 0  # jobs Redis holds for sure
        sent = 0  # jobs a step was sent for (a step that failed unseen may have run)
        leading: dict[str, str] = {}
        # Jobs that all fit one step and follow nobody: staged and published in that step.
        at_once = not keyed and len(fresh) <= STAGE_CHUNK
        try:
            for start in range(0, len(fresh), STAGE_CHUNK):
                part = fresh[start:start + STAGE_CHUNK]
                sent = start + len(part)
                if self.queue.stage(part, ttl_s=ttl, max_pending=limit, publish=at_once,
                                    spec_json=spec_json) is None:
                    self._undo(fresh, fresh[:staged], "over quota")
                    over = next((t for t, n in Counter(s.tenant for s in fresh).items()
                                 if self.queue.pending_count(t) + n > limit), fresh[0].tenant)
                    raise TenantQuotaExceeded(over, limit)
                staged += len(part)
            if at_once:
                return
            publish = fresh
            if keyed:
                wanted = [s for s in fresh if s.id in keyed]
                leaders = self.queue.coalesce(wanted, [keyed[s.id] for s in wanted], ttl)
                leading = {s.id: keyed[s.id] for s, lead in zip(wanted, leaders, strict=True)
                           if lead == s.id}
                following = {s.id for s, lead in zip(wanted, leaders, strict=True)
                             if lead != s.id}
                publish = [s for s in fresh if s.id not in following]
            for start in range(0, len(publish), PUBLISH_CHUNK):
                self.queue.publish([s.id for s in publish[start:start + PUBLISH_CHUNK]])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # The step in flight may have run: withdraw it too (a tombstone each).
            self._release(leading)
            self._undo(fresh, fresh[:sent], str(exc))
            raise ServiceUnavailable(f"Redis failed during the submit ({exc}); nothing was "
                                     "submitted, try again") from exc
        except redis.RedisError as exc:  # refused: the failed step did nothing
            self._release(leading)
            self._undo(fresh, fresh[:staged], str(exc))
            raise ServiceUnavailable(f"Redis refused the jobs ({exc}); nothing was "
                                     "submitted, try again") from exc

    def _release(self, leading: dict[str, str]) -> None:
        """A submit that is undone leads nobody: jobs that followed its jobs run alone."""
        with contextlib.suppress(redis.RedisError):
            for job_id, key in leading.items():
                self.queue.release_followers(self.queue.take_followers(job_id, key))

    def _undo(self, fresh: list[JobSpec], held: list[JobSpec], why: str) -> None:
        """Withdraw the jobs Redis may hold (``held``) and remove all of ``fresh`` from
        SQL; jobs the scheduler already took stay (accepted). ``SubmitUnconfirmed`` when
        Redis or SQL cannot be reached to finish the undo."""
        kept: set[str] = set()
        try:
            for start in range(0, len(held), STAGE_CHUNK):
                part = held[start:start + STAGE_CHUNK]
                found = self.queue.withdraw(part)
                kept |= {s.id for s, st in zip(part, found, strict=True) if st != "WITHDRAWN"}
        except redis.RedisError as exc:
            raise SubmitUnconfirmed([s.id for s in fresh], f"{why}; then {exc}") from exc
        try:
            self.store.delete([s.id for s in fresh if s.id not in kept])
        except Exception as exc:  # the reconciler ends withdrawn rows as CANCELLED
            raise SubmitUnconfirmed([s.id for s in fresh],
                                    f"{why}; then the job store: {exc}") from exc
        if kept:
            raise SubmitUnconfirmed(sorted(kept), f"{why}; these were already scheduled")

    def check_quota(self, specs: Sequence[JobSpec]) -> None:
        """Raise ``TenantQuotaExceeded`` if the jobs would take a tenant over its quota."""
        limit = self.settings.max_pending_per_tenant
        for tenant, n in Counter(s.tenant for s in specs).items():
            try:
                pending = self.queue.pending_count(tenant)
            except redis.RedisError as exc:
                raise ServiceUnavailable(f"Redis is unavailable ({exc}); try again") from exc
            if pending + n > limit:
                raise TenantQuotaExceeded(tenant, limit)

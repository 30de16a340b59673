"""Submit: a producer's steps. Stage jobs (written, counted against their tenants'
quotas, invisible to the scheduler), publish them into intake, withdraw a submit that
failed half way, cancel."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

from config import keys
from jobs import stats
from jobs.models import JobSpec
from jobs.steps.base import Steps

#: A withdrawn submit's tombstone lives this long: past any late copy of the submit, and
#: past the reconciler's next passes (which end a withdrawn job left in SQL CANCELLED).
TOMBSTONE_TTL_S = 3600


class Submit(Steps):
    """Submit: see the module."""

    def bind_store(self, store_id: str, where: str) -> None:
        """Check that this Redis is used with the job store ``store_id`` (publishing it if
        no process has yet); ``StoreMismatch`` if the others use another store."""
        from jobs.errors import StoreMismatch

        self.r.set(keys.STORE, json.dumps({"id": store_id, "where": where}), nx=True)
        theirs = json.loads(self.r.get(keys.STORE) or "{}")
        if theirs.get("id") != store_id:
            raise StoreMismatch(where, str(theirs.get("where")))

    def enqueue(self, specs: Sequence[JobSpec], *, ttl_s: int, max_pending: int) -> list[int]:
        """Write each job's payload and intake entry in one atomic step (pipelined).

        Returns per job: 1 enqueued, 0 already there, -1 refused (tenant over quota).
        """
        pipe = self.r.pipeline(transaction=False)
        for spec in specs:
            self._enqueue(
                keys=[keys.job(spec.id), keys.INTAKE, keys.tenant_pending(spec.tenant)],
                args=[spec.id, spec.model_dump_json(), ttl_s, max_pending, int(spec.priority),
                      spec.tenant, "" if spec.deadline is None else repr(spec.deadline)],
                client=pipe,
            )
        return [int(code) for code, _sid in pipe.execute()]

    def stage(self, specs: Sequence[JobSpec], *, ttl_s: int, max_pending: int,
              publish: bool = False, spec_json: Mapping[str, str] | None = None,
              ) -> list[int] | None:
        """Stage jobs in one atomic step: written and counted against their tenants'
        quotas, invisible to the scheduler until ``publish`` (or, with ``publish``, put
        into intake in the same step). None (nothing written) when a tenant would go over
        ``max_pending``; else per job 1 staged, 0 already there. ``spec_json``: the specs'
        JSON by id, when the caller has it."""
        job_keys: list[str] = [keys.INTAKE, keys.STATS, keys.recent(stats.bucket_of(time.time()))]
        args: list[str | int] = [ttl_s, max_pending, "1" if publish else "0",
                                 stats.BUCKET_TTL_S]
        for spec in specs:
            job_keys += [keys.job(spec.id), keys.tenant_pending(spec.tenant)]
            text = spec_json.get(spec.id) if spec_json else None
            args += [spec.id, text or spec.model_dump_json(), int(spec.priority), spec.tenant,
                     "" if spec.deadline is None else repr(spec.deadline),
                     stats.label(spec.tenant, spec.provider, spec.model)]
        reply = self._stage(keys=job_keys, args=args)
        if reply and int(reply[0]) == -1:
            return None
        return [int(x) for x in reply]

    def publish(self, job_ids: Sequence[str]) -> int:
        """Put staged jobs into intake, all in one atomic step; return how many."""
        if not job_ids:
            return 0
        recent = keys.recent(stats.bucket_of(time.time()))
        return int(self._publish(
            keys=[keys.INTAKE, keys.STATS, recent, *(keys.job(j) for j in job_ids)],
            args=[stats.BUCKET_TTL_S, *job_ids]))

    def withdraw(self, specs: Sequence[JobSpec]) -> list[str]:
        """Undo a failed submit: per job 'WITHDRAWN' (it will never run), or the state of
        a job the scheduler already took (it is accepted)."""
        job_keys: list[str] = []
        for spec in specs:
            job_keys += [keys.job(spec.id), keys.tenant_pending(spec.tenant)]
        reply = self._withdraw(keys=[keys.INTAKE, *job_keys],
                               args=[TOMBSTONE_TTL_S, *(s.id for s in specs)])
        return [str(x) for x in reply]

    def pending_count(self, tenant: str) -> int:
        """Jobs of ``tenant`` waiting to be sent."""
        return int(self.r.scard(keys.tenant_pending(tenant)))

    def cancel(self, job_id: str) -> str:
        """Mark a QUEUED or SCHEDULED job CANCELLED; return the state found ('' if unknown)."""
        return str(self._cancel(keys=[keys.job(job_id), keys.EVENTS], args=[job_id]))

    def cancel_many(self, job_ids: Sequence[str]) -> list[str]:
        """``cancel`` of each job, in one round trip; the states found."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            self._cancel(keys=[keys.job(job_id), keys.EVENTS], args=[job_id], client=pipe)
        return [str(x) for x in self._at_once(pipe)] if job_ids else []

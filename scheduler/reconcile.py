"""The reconciler: the SQL store is the durable record; Redis is made to agree with it.

Run by the active scheduler when it takes the lease and every ``reconcile_interval_s``:

* a job that is not final in SQL and unknown to Redis (Redis lost its data, or the
  payload expired) is enqueued again, with its original id, priority and deadline;
* a job whose cancellation was recorded in Redis but not in SQL (a cancel cut short) is
  finished as CANCELLED; a final result in Redis that SQL lacks is copied to SQL;
* a final result in SQL that the result backend lacks (it was unreachable, or lost its
  data) is written back: for the jobs finished since the previous pass, or, when Redis
  lost its data (the ``pb:alive`` marker is gone), for all finished within
  ``result_ttl_s``.

Jobs younger than ``reconcile_grace_s`` are left alone: a producer may be between its
SQL write and its Redis write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from config.settings import Settings
from jobs.models import JobResult, JobState
from jobs.outcomes import record_results
from jobs.queue import RedisQueue
from jobs.store import JobStore

log = logging.getLogger(__name__)

PAGE = 1000


@dataclass
class Repairs:
    """What one pass repaired."""

    reenqueued: int = 0
    finished: int = 0
    written_back: int = 0

    def __bool__(self) -> bool:
        return bool(self.reenqueued or self.finished or self.written_back)


def reconcile(store: JobStore, queue: RedisQueue, settings: Settings, now: float,
              results_since: float) -> Repairs:
    """One pass over the unfinished jobs, and over the results of jobs finished since
    ``results_since``. ``now`` is passed in."""
    repairs = Repairs()
    after = ""
    while True:
        rows = store.unfinished(limit=PAGE, after=after)
        if not rows:
            break
        after = rows[-1].spec.id
        rows = [r for r in rows if now - r.spec.created_at >= settings.reconcile_grace_s]
        if not rows:
            continue
        ids = [r.spec.id for r in rows]
        states = queue.states(ids)
        results = queue.results(ids)
        lost, done, done_tenants = [], [], []
        for row, state, result in zip(rows, states, results, strict=True):
            if result is not None:
                done.append(result)
                done_tenants.append(row.spec.tenant)
            elif state is None:
                lost.append(row.spec)
            elif state == JobState.CANCELLED:
                done.append(JobResult(id=row.spec.id, state=JobState.CANCELLED,
                                      created_at=row.spec.created_at, finished_at=now,
                                      error="cancelled by the caller"))
                done_tenants.append(row.spec.tenant)
        if lost:
            codes = queue.enqueue(lost, ttl_s=settings.payload_ttl_s, max_pending=0)
            repairs.reenqueued += sum(1 for c in codes if c == 1)
        if done:
            repairs.finished += len(record_results(store, queue, done, done_tenants,
                                                   result_ttl_s=settings.result_ttl_s))
    repairs.written_back = _write_back(store, queue, settings,
                                       max(results_since, now - settings.result_ttl_s))
    if repairs:
        log.warning("reconciler: re-enqueued %d jobs Redis did not hold, finished %d, wrote "
                    "back %d results", repairs.reenqueued, repairs.finished,
                    repairs.written_back)
    return repairs


def _write_back(store: JobStore, queue: RedisQueue, settings: Settings, since: float) -> int:
    written = 0
    cursor = (0.0, "")
    while True:
        rows = store.finished_since(since, limit=PAGE, after=cursor)
        if not rows:
            return written
        last = rows[-1]
        cursor = (last.result.finished_at if last.result else 0.0, last.spec.id)
        have = queue.results([r.spec.id for r in rows])
        missing = [(r.result, r.spec.tenant) for r, h in zip(rows, have, strict=True)
                   if h is None and r.result is not None]
        if missing:
            stored = queue.finish([m[0] for m in missing], [m[1] for m in missing],
                                  result_ttl_s=settings.result_ttl_s)
            written += sum(stored)

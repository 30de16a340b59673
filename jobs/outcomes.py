"""Recording final results: the SQL store first (durable), then the result backend."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.models import JobResult
from jobs.queue import RedisQueue
from jobs.store import JobStore


def record_results(store: JobStore, queue: RedisQueue, results: Sequence[JobResult],
                   tenants: Sequence[str], *, result_ttl_s: int) -> set[str]:
    """Store final results; return the ids whose result this call stored.

    SQL decides who wins (a conditional UPDATE); only the winners are written to Redis,
    where ``SET NX`` keeps the first as well. Should the Redis write fail, the result is
    safe in SQL and the reconciler copies it to the result backend later.
    """
    won = set(store.finalize(results))
    mine = [(r, t) for r, t in zip(results, tenants, strict=True) if r.id in won]
    if mine:
        queue.finish([r for r, _ in mine], [t for _, t in mine], result_ttl_s=result_ttl_s)
    return won

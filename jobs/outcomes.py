"""Recording final results: the SQL store first (durable), then the result backend."""

from __future__ import annotations

from collections.abc import Sequence

from jobs import cache
from jobs.models import JobResult
from jobs.queue import RedisQueue
from jobs.store import JobStore


def record_results(store: JobStore, queue: RedisQueue, results: Sequence[JobResult],
                   tenants: Sequence[str], *, result_ttl_s: int,
                   classes: Sequence[int] | None = None) -> set[str]:
    """Store final results; return the ids whose result this call stored.

    SQL decides who wins (a conditional UPDATE); only the winners are written to Redis,
    where ``SET NX`` keeps the first as well. Should the Redis write fail, the result is
    safe in SQL and the reconciler copies it to the result backend later.
    """
    won = set(store.finalize(results))
    cls = list(classes) if classes is not None else [-1] * len(results)
    mine = [(r, t, c) for r, t, c in zip(results, tenants, cls, strict=True) if r.id in won]
    if mine:
        stored = queue.finish_leading([r for r, _, _ in mine], [t for _, t, _ in mine],
                                      result_ttl_s=result_ttl_s,
                                      classes=None if classes is None else [c for _, _, c in mine])
        cache.settle(queue, [r for r, _, _ in mine], stored,  # jobs others waited for
                     lambda res, ts, cs: record_results(store, queue, res, ts,
                                                        result_ttl_s=result_ttl_s, classes=cs))
    return won

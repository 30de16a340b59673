"""Recording final results: the one path from a final result to everything that follows.

Every way a job ends goes through ``record_results``: a worker's results, the scheduler's
expiries, cancellations and semantic-cache answers, the answers of the exact cache at
submit, the followers of a coalesced request, and the reconciler's repairs. In order:

1. **SQL first**, the durable record: a conditional UPDATE, so the first result wins
   (``JobStore.finalize``). Results SQL already holds (``in_sql``: rows inserted final at
   submit, or the reconciler copying SQL's own result back) skip this step.
2. ``before_publish`` (the worker puts successful answers into the exact cache, before
   any follower or caller can see them).
3. **Redis, in one Lua step per chunk** (``jobs/lua/finish_many.lua``): the result
   backend (``SET NX``: a result there stays), the job's state, its stream's ``end``, the
   stream of stored ids, and the counters, exactly once.
4. **Followers**: jobs that waited for one of these (coalesced identical requests) end
   with its answer through this same function, or run on their own if it failed.

Should Redis fail after step 1, the result is safe in SQL and the reconciler copies it to
the result backend later (through this function, ``in_sql``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from jobs import cache
from jobs.models import JobResult
from jobs.queue import RedisQueue
from jobs.store import JobStore

T = TypeVar("T")


class Steady(Protocol):
    """Runs one step, waiting out an outage (a worker's ``BatchRunner.steady``)."""

    def __call__(self, name: str, step: Callable[[], T], /) -> T: ...


def _direct(_name: str, step: Callable[[], T]) -> T:
    return step()


def record_results(store: JobStore, queue: RedisQueue, results: Sequence[JobResult],
                   tenants: Sequence[str], *, result_ttl_s: int,
                   classes: Sequence[int] | None = None,
                   dumped: Mapping[str, str] | None = None, in_sql: bool = False,
                   submitted: bool = False, hit: str = "",
                   before_publish: Callable[[list[JobResult]], object] | None = None,
                   steady: Steady | None = None) -> set[str]:
    """Record final results; return the ids whose result this call stored (in SQL; with
    ``in_sql``, in the result backend).

    ``classes``: each job's class (else the one Redis holds). ``dumped``: each result's
    JSON by id, when the caller has it. ``submitted``: jobs answered at their submit
    (counted as submitted with their result); ``hit``: the cache that answered them
    (``exact``, ``semantic``, ``coalesced``). ``steady``: runs each step, retrying it
    through an outage (default: once, errors raised).
    """
    if not results:
        return set()
    run: Steady = steady or _direct
    if in_sql:
        won = {r.id for r in results}
    else:
        won = set(run("store", lambda: store.finalize(results, dumped)))
    cls = list(classes) if classes is not None else [-1] * len(results)
    mine = [(r, t, c) for r, t, c in zip(results, tenants, cls, strict=True) if r.id in won]
    if not mine:
        return set()
    done = [r for r, _, _ in mine]
    if before_publish is not None:
        run("cache", lambda: before_publish(done))
    stored = run("publish", lambda: queue.finish(
        done, [t for _, t, _ in mine], result_ttl_s=result_ttl_s,
        classes=None if classes is None else [c for _, _, c in mine], dumped=dumped,
        submitted=submitted, hit=hit))
    if any(isinstance(x, str) for x in stored):  # identical requests waited for these
        run("followers", lambda: cache.settle(
            queue, done, stored,
            lambda res, ts, cs: record_results(store, queue, res, ts,
                                               result_ttl_s=result_ttl_s, classes=cs,
                                               hit="coalesced", steady=steady)))
    if in_sql:
        return {r.id for r, x in zip(done, stored, strict=True) if x}
    return won

"""Recording final results: the one path from a final result to everything that follows.

Every way a job ends goes through ``record_results``: a worker's results, the scheduler's
expiries, cancellations and semantic-cache answers, the answers of the exact cache at
submit, the followers of a coalesced request, and the reconciler's repairs. In order:

0. **Priced** (``prices``): each result's usage gets its ``cost_usd`` and ``saved_usd``
   (``jobs.costs``), unless it has them.
1. **SQL first**, the durable record: a conditional UPDATE, so the first result wins
   (``JobStore.finalize``), and in the same transaction the spend and savings of the jobs
   it made final and their budgets settled (``jobs.ledger``): money is counted once.
   Results SQL already holds (``in_sql``: rows inserted final at submit, with their
   ledger rows, or the reconciler copying SQL's own result back) skip this step.
2. ``before_publish`` (the worker puts successful answers into the exact cache, before
   any follower or caller can see them).
3. **Redis, in one Lua step per chunk** (``jobs/lua/finish_many.lua``): the result
   backend (``SET NX``: a result there stays), the job's state, its stream's ``end``, the
   stream of stored ids, and the counters (jobs, spend and savings), exactly once.
4. **Followers**: jobs that waited for one of these (coalesced identical requests) end
   with its answer through this same function, or run on their own if it failed.

Should Redis fail after step 1, the result is safe in SQL and the reconciler copies it to
the result backend later (through this function, ``in_sql``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from jobs import cache, costs, ledger, stats
from jobs.models import JobResult
from jobs.prices import PriceBook
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
                   steady: Steady | None = None, prices: PriceBook | None = None,
                   ) -> set[str]:
    """Record final results; return the ids whose result this call stored (in SQL; with
    ``in_sql``, in the result backend).

    ``classes``: each job's class (else the one Redis holds). ``dumped``: each result's
    JSON by id, when the caller has it. ``submitted``: jobs answered at their submit
    (counted as submitted with their result); ``hit``: the cache that answered them
    (``exact``, ``semantic``, ``coalesced``). ``steady``: runs each step, retrying it
    through an outage (default: once, errors raised). ``prices``: the deployments' prices
    (None: results are recorded with the cost they carry, and spend only from those).
    """
    if not results:
        return set()
    run: Steady = steady or _direct
    if in_sql:
        won = {r.id for r in results}
        entries = ledger.entries_of((r, costs.charge(r, prices)) for r in results)
    else:
        results, dumped, entries = _priced(results, dumped, prices)
        won = set(run("store", lambda: store.finalize(results, dumped, entries)))
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
        submitted=submitted, hit=hit, money=_money(mine, entries)))
    if any(isinstance(x, str) for x in stored):  # identical requests waited for these
        run("followers", lambda: cache.settle(
            queue, done, stored,
            lambda res, ts, cs: record_results(store, queue, res, ts,
                                               result_ttl_s=result_ttl_s, classes=cs,
                                               hit="coalesced", steady=steady,
                                               prices=prices),
            prices))
    if in_sql:
        return {r.id for r, x in zip(done, stored, strict=True) if x}
    return won


def _money(mine: Sequence[tuple[JobResult, str, int]],
           entries: Mapping[str, ledger.Entry]) -> dict[str, str]:
    """What each job spent and saved, for the counters of ``finish_many``."""
    out = {}
    for r, tenant, _ in mine:
        e = entries.get(r.id)
        if e is not None and (e.charge.cost or e.charge.saved):
            out[r.id] = stats.money_fields(tenant, e.provider, e.model, e.charge.cost,
                                           e.charge.saved)
    return out


def _priced(results: Sequence[JobResult], dumped: Mapping[str, str] | None,
            prices: PriceBook | None,
            ) -> tuple[Sequence[JobResult], Mapping[str, str] | None, dict[str, ledger.Entry]]:
    """The results with their cost (a result priced here loses its ``dumped`` JSON, which
    lacks it), and their ledger entries."""
    pairs = [costs.priced(r, prices) for r in results]
    changed = {new.id for new, old in zip((p[0] for p in pairs), results, strict=True)
               if new is not old}
    if changed and dumped is not None:
        dumped = {k: v for k, v in dumped.items() if k not in changed}
    return [p[0] for p in pairs], dumped, ledger.entries_of(pairs)

"""The reconciler: the SQL store is the durable record; Redis is made to agree with it.

The active scheduler runs one pass when it takes the lease (continuing the previous
scheduler's pass if one was under way) and then one every ``reconcile_interval_s``. A
pass works in bounded pages (``PAGE`` rows, one index range of the SQL store each) that
the scheduler runs a few at a time between its ticks, so a pass over a million
unfinished jobs never holds up scheduling or costs the scheduler its lease. The pass's
position is kept in Redis (``pb:reconcile``): a scheduler that takes over continues it.

* a job that is not final in SQL and unknown to Redis (Redis lost its data, or the
  payload expired) is enqueued again, with its original id, priority and deadline;
* a job that Redis holds as SCHEDULED or RUNNING in a batch that is no longer in flight
  (its task was lost: dropped while Redis was down for longer than the task could wait)
  goes back into intake, to run in a new batch (the old one can no longer run it); so
  does a job Redis holds AT_PROVIDER whose provider batch the store never recorded;
* a job waiting at a provider (``AT_PROVIDER`` in the store: the half-price lane) is
  left alone, however long it waits: its provider batch's record brings its result
  (``workers.lane``);
* a submit cut short by a Redis failure is completed: a job still STAGED is published
  into intake; a job its producer withdrew (WITHDRAWN) but could not remove from SQL
  ends CANCELLED;
* a job whose cancellation was recorded in Redis but not in SQL (a cancel cut short) is
  finished as CANCELLED; a final result in Redis that SQL lacks is copied to SQL;
* a final result in SQL that the result backend lacks (it was unreachable, or lost its
  data) is written back: for the jobs finished since the previous pass began, or, when
  Redis lost its data (the ``pb:alive`` marker is gone), for all finished within
  ``result_ttl_s``.

Jobs younger than ``reconcile_grace_s`` are left alone: a producer may be between its
SQL write and its Redis write.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from config import keys
from config.settings import Settings
from jobs.models import JobResult, JobState
from jobs.outcomes import record_results
from jobs.prices import PriceBook
from jobs.queue import RedisQueue
from jobs.store import JobStore

log = logging.getLogger(__name__)

#: Rows per page.
PAGE = 1000
#: The non-final states, scanned in this order.
_SCANNED = (JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING)


@dataclass
class Repairs:
    """What one pass repaired."""

    reenqueued: int = 0
    finished: int = 0
    written_back: int = 0
    requeued: int = 0

    def __bool__(self) -> bool:
        return bool(self.reenqueued or self.finished or self.written_back or self.requeued)


@dataclass
class PassState:
    """Where a pass is: the phase, its cursors, and what it repaired so far."""

    started: float
    results_since: float
    phase: str = "jobs"  #: 'jobs' (unfinished rows), then 'results', then 'done'
    state: int = 0  #: index into the scanned states
    after: str = ""  #: last job id seen in the current state
    done_at: float = 0.0  #: results: (finished_at, id) of the last row seen
    done_id: str = ""
    reenqueued: int = 0
    finished: int = 0
    written_back: int = 0
    requeued: int = 0

    def repairs(self) -> Repairs:
        return Repairs(self.reenqueued, self.finished, self.written_back, self.requeued)


class LeaseLost(Exception):
    """Raised inside a scheduler's step when it finds it no longer holds the lease."""


class Reconciler:
    """Runs passes page by page; ``step`` does a bounded amount of work. ``token``: the
    scheduler lease its writes are fenced by ('' for a tool run without a scheduler)."""

    def __init__(self, store: JobStore, queue: RedisQueue, settings: Settings,
                 token: str = "", prices: PriceBook | None = None) -> None:
        self.store = store
        self.queue = queue
        self.settings = settings
        self.token = token
        #: Prices of the results it records (their savings by reason are counted from them).
        self.prices = PriceBook.for_settings(settings) if prices is None else prices
        self.current: PassState | None = None
        self.last_finished = 0.0

    # --- the pass's position, kept in Redis --------------------------------------------

    def resume(self) -> None:
        """Take over the pass in progress (or start one at the next step)."""
        raw = self.queue.r.hgetall(keys.RECONCILE)
        self.current = None
        self.last_finished = 0.0
        if raw.get("pass"):
            self.current = PassState(**json.loads(raw["pass"]))
        elif raw.get("finished"):
            self.last_finished = float(raw["finished"])

    def start_soon(self) -> None:
        """Start a pass at the next step, unless one is under way (after a failover)."""
        self.last_finished = 0.0

    def _save(self) -> None:
        if self.current is not None:
            self.queue.r.hset(keys.RECONCILE, "pass", json.dumps(asdict(self.current)))

    def due(self, now: float) -> bool:
        """Whether a pass is under way or should start."""
        return self.current is not None or (
            now - self.last_finished >= self.settings.reconcile_interval_s)

    # --- work ----------------------------------------------------------------------------

    def step(self, now: float, budget_s: float) -> Repairs | None:
        """Work through pages for about ``budget_s`` seconds (at least one page); return
        the pass's repairs when it completes, else None."""
        if not self.due(now):
            return None
        if self.current is None:
            self.current = self._start(now)
        until = time.monotonic() + budget_s
        while self.current.phase != "done":
            if self.current.phase == "jobs":
                self._jobs_page(now)
            else:
                self._results_page()
            self._save()
            if time.monotonic() >= until:
                return None
        return self._complete(now)

    def run_pass(self, now: float) -> Repairs:
        """A whole pass at once (for tests and tools)."""
        self.current = self._start(now)
        while True:
            repairs = self.step(now, 3600.0)
            if repairs is not None:
                return repairs

    def _start(self, now: float) -> PassState:
        # SET NX answers True when it set the marker: Redis had lost it (or is new).
        lost = bool(self.queue.r.set(keys.ALIVE, "1", nx=True))
        previous = self.queue.r.hget(keys.RECONCILE, "started")
        since = now - self.settings.result_ttl_s
        if not lost and previous:
            since = max(since, float(previous) - self.settings.reconcile_interval_s)
        self.queue.r.hset(keys.RECONCILE, "started", str(now))
        return PassState(started=now, results_since=since)

    def _complete(self, now: float) -> Repairs:
        assert self.current is not None
        repairs = self.current.repairs()
        pipe = self.queue.r.pipeline()
        pipe.hdel(keys.RECONCILE, "pass")
        pipe.hset(keys.RECONCILE, "finished", str(now))
        pipe.execute()
        self.current = None
        self.last_finished = now
        if repairs:
            log.warning("reconciler: re-enqueued %d jobs Redis did not hold, put back %d "
                        "jobs of lost batches, finished %d, wrote back %d results",
                        repairs.reenqueued, repairs.requeued, repairs.finished,
                        repairs.written_back)
        return repairs

    def _jobs_page(self, now: float) -> None:
        p = self.current
        assert p is not None
        rows = self.store.unfinished_page(_SCANNED[p.state], after=p.after, limit=PAGE)
        if not rows:
            p.state, p.after = p.state + 1, ""
            if p.state >= len(_SCANNED):
                p.phase = "results" if self.settings.reconcile_write_back else "done"
            return
        p.after = rows[-1][0]
        # The grace counts from when a row was written: a long submit writes its rows
        # well after its jobs were created, and must not see them re-enqueued.
        old = [r[:3] for r in rows if now - r[3] >= self.settings.reconcile_grace_s]
        if not old:
            return
        page = _sort(old, self.queue, now)
        if page.lost:
            specs = [s.spec for s in self.store.get_many(page.lost).values()
                     if not s.state.final]
            codes = self.queue.enqueue(specs, ttl_s=self.settings.payload_ttl_s, max_pending=0)
            p.reenqueued += sum(1 for c in codes if c == 1)
        if page.done:
            p.finished += len(record_results(self.store, self.queue, page.done, page.tenants,
                                             result_ttl_s=self.settings.result_ttl_s,
                                             prices=self.prices))
        if page.sent:
            p.requeued += self._requeue_orphans(page.sent)
        if page.staged:
            p.reenqueued += self.queue.publish(page.staged)
        if page.following:  # a leader that ended without handing them over
            p.requeued += len(self.queue.release_orphan_followers(page.following))

    def _requeue_orphans(self, sent: dict[str, str]) -> int:
        """Jobs whose batch is no longer in flight go back into intake (fenced by the
        scheduler's lease: ``LeaseLost`` once it is another's)."""
        flying = self.queue.in_flight(sorted(set(sent.values())))
        orphans = {j: b for j, b in sent.items() if b not in flying}
        if not orphans:
            return 0
        stored = self.store.get_many(list(orphans))
        done = 0
        for job_id, batch_id in orphans.items():
            if job_id not in stored or stored[job_id].state.final:
                continue
            moved = self.queue.requeue(stored[job_id].spec, batch_id, self.token)
            if moved is None:
                raise LeaseLost
            done += moved
        return done

    def _results_page(self) -> None:
        p = self.current
        assert p is not None
        # Only results that would still be in the result backend had they been stored
        # there: a result lives result_ttl_s from its storing, which is no earlier than
        # its finish. A pass that pages through many rows reaches its first rows minutes
        # after it began; by then the oldest have expired as they should, and writing
        # them back would bring them back (and count them as finished again).
        ttl = self.settings.result_ttl_s
        alive = time.time() - ttl + min(60.0, ttl / 10)
        rows = self.store.finished_page(max(p.results_since, alive),
                                        after=(p.done_at, p.done_id), limit=PAGE)
        if not rows:
            p.phase = "done"
            return
        p.done_at, p.done_id = rows[-1][2], rows[-1][0]
        have = self.queue.have_results([r[0] for r in rows])
        lacking = {job_id: tenant for (job_id, tenant, _), h in zip(rows, have, strict=True)
                   if not h}
        raw = self.store.outcomes(list(lacking)) if lacking else {}
        missing = [(JobResult.model_validate_json(text), lacking[job_id])
                   for job_id, text in raw.items() if text is not None]
        if missing:
            p.written_back += len(record_results(
                self.store, self.queue, [m[0] for m in missing], [m[1] for m in missing],
                result_ttl_s=self.settings.result_ttl_s, in_sql=True, prices=self.prices))


#: Redis states that end a job CANCELLED in SQL, with the reason.
_CANCELLED_WHY = {JobState.CANCELLED.value: "cancelled by the caller",
                  "WITHDRAWN": "the submit failed and was withdrawn; the job never ran"}


@dataclass
class _Page:
    """What a page of unfinished SQL rows needs, by what Redis holds of each."""

    lost: list[str] = field(default_factory=list)  #: unknown to Redis: enqueue again
    done: list[JobResult] = field(default_factory=list)  #: final in Redis: record in SQL
    tenants: list[str] = field(default_factory=list)  #: the tenant of each of ``done``
    sent: dict[str, str] = field(default_factory=dict)  #: job -> batch it was sent in
    staged: list[str] = field(default_factory=list)  #: staged by a submit cut short
    following: list[str] = field(default_factory=list)  #: waiting for an identical job


def _sort(rows: list[tuple[str, str, float]], queue: RedisQueue, now: float) -> _Page:
    ids = [r[0] for r in rows]
    found = queue.states_and_batches(ids)
    results = queue.results(ids)
    page = _Page()
    for (job_id, tenant, created), (state, batch), result in zip(rows, found, results,
                                                                 strict=True):
        if result is not None:
            page.done.append(result)
            page.tenants.append(tenant)
        elif state is None:
            page.lost.append(job_id)
        elif state in (JobState.SCHEDULED, JobState.RUNNING, JobState.AT_PROVIDER) and batch:
            # AT_PROVIDER here: the store never recorded its provider batch (the scheduler
            # died between claim and record; a job the store records at a provider is not
            # scanned): no worker runs it, so it goes back into intake.
            page.sent[job_id] = batch
        elif state == "STAGED":
            page.staged.append(job_id)
        elif state == "FOLLOWING":
            page.following.append(job_id)
        elif state in _CANCELLED_WHY:
            page.done.append(JobResult(id=job_id, state=JobState.CANCELLED, created_at=created,
                                       finished_at=now, error=_CANCELLED_WHY[state]))
            page.tenants.append(tenant)
    return page


def reconcile(store: JobStore, queue: RedisQueue, settings: Settings, now: float) -> Repairs:
    """One whole pass (for tests and tools; the scheduler runs passes in slices)."""
    return Reconciler(store, queue, settings).run_pass(now)

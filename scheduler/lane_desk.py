"""The scheduler's side of the half-price lane: which admitted jobs go to a provider
batch (``jobs.lanes.choose``), when a provider batch leaves (``scheduler.lanes.plan_lane``),
and when each open one is next looked at. The provider I/O is the workers'
(``workers.lane``); this sends them tasks.

Sending a provider batch: its jobs are claimed in Redis (``lane_claim``, fenced by the
lease: AT_PROVIDER, out of intake), then recorded in SQL (the batch ``creating``, its jobs
AT_PROVIDER with its id, in one transaction), then the task that uploads it is sent. A
scheduler that dies between the claim and the record leaves jobs AT_PROVIDER in Redis
that the store still has QUEUED: the reconciler puts them back into intake. One that
dies after the record loses nothing: every open provider batch is in SQL, and the sweep
(once a second, on the active scheduler) sends each one's task when it is due:

* ``creating``: the upload again, ``batch_api_submit_retry_s`` after the last (its
  worker was lost; the provider is asked first whether it holds the batch already);
* ``submitted``: a poll, ``batch_api_poll_min_s`` after the upload, the wait doubling
  at each poll up to ``batch_api_poll_max_s``: one request per open batch;
* ``ended``: the collection of its results again, if it did not finish.

A cancel of a job waiting at a provider makes its batch due at once: the poll cancels it
at the provider when none of its jobs is left.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from config import keys
from config.celery import LANE_POLL, LANE_SUBMIT
from config.settings import Settings
from jobs.lanes import choose
from jobs.models import JobSpec
from jobs.provider_batches import ProviderBatch, ProviderBatches, test_fault
from jobs.queue import RedisQueue
from jobs.store import JobStore
from scheduler.lanes import LaneBatch, LanePending, lane_job, plan_lane
from scheduler.reconcile import LeaseLost

log = logging.getLogger(__name__)

#: How often the open provider batches are read from SQL, in seconds.
SWEEP_EVERY_S = 1.0
#: Open provider batches the overview lists (all are counted).
SHOWN = 20
#: Jobs claimed per Lua step (a provider batch may hold 100,000).
CLAIM_CHUNK = 1000


def next_due(rec: ProviderBatch, now: float, settings: Settings) -> float:
    """When the task of an open provider batch is next sent (pure)."""
    if rec.state == "submitted":
        wait = settings.batch_api_poll_min_s * float(2 ** min(rec.polls, 30))
        return now + min(settings.batch_api_poll_max_s, wait)
    if rec.state == "ended":
        return now + settings.batch_api_poll_max_s
    return now + settings.batch_api_submit_retry_s


class LaneDesk:
    """The lane jobs waiting in the scheduler, and the open provider batches."""

    def __init__(self, settings: Settings, queue: RedisQueue, store: JobStore,
                 celery: Celery, token: str, renew: Callable[[], None]) -> None:
        self.settings = settings
        self.queue = queue
        self.lanes = ProviderBatches(store)
        self.celery = celery
        self.token = token
        self.renew = renew
        self.pending = LanePending()
        #: The open provider batches, as the last sweep read them.
        self.open: list[ProviderBatch] = []
        self._last_sweep = 0.0

    def __len__(self) -> int:
        return len(self.pending)

    def reset(self) -> None:
        """Forget the jobs waiting here (intake is the truth; they are read again)."""
        self.pending = LanePending()
        self._last_sweep = 0.0

    def admit(self, specs: Sequence[JobSpec], now: float) -> list[JobSpec]:
        """Keep the jobs that go to a provider batch; return the others (the fast path)."""
        fast: list[JobSpec] = []
        lane = []
        for spec in specs:
            if spec.id in self.pending:
                continue
            if choose(spec, self.settings, now) == "provider_batch":
                lane.append(lane_job(spec))
            else:
                fast.append(spec)
        self.pending.add(lane)
        return fast

    def remove(self, job_ids: Sequence[str]) -> None:
        """Jobs that no longer wait here (cancelled)."""
        self.pending.remove(job_ids)

    # --- sending ------------------------------------------------------------------------

    def tick(self, now: float, full: bool) -> int:
        """Send the provider batches due now; how many jobs left."""
        sent = 0
        for batch in plan_lane(self.pending, now, self.settings, full):
            sent += self._send(batch)
            self.renew()
        return sent

    def _send(self, batch: LaneBatch) -> int:
        batch_id = str(uuid.uuid4())
        claimed: list[str] = []
        for start in range(0, len(batch.jobs), CLAIM_CHUNK):  # no long Lua step
            part = batch.jobs[start:start + CLAIM_CHUNK]
            got = self.queue.lane_claim(self.token, batch_id, [(j.id, j.tenant) for j in part],
                                        time.time())
            if got is None:  # what was claimed waits for the reconciler (never recorded)
                raise LeaseLost
            claimed += got
            self.renew()
        self.pending.remove([j.id for j in batch.jobs])
        if not claimed:
            return 0
        test_fault(self.settings.batch_api_test_fault, "after_claim")
        now = time.time()
        self.lanes.record(batch_id, batch.deployment, claimed, now,
                          now + self.settings.batch_api_submit_retry_s, between=self.renew)
        self._task(LANE_SUBMIT, batch_id)
        log.info("provider batch %s: %d jobs for %s (%s)", batch_id, len(claimed),
                 batch.deployment, batch.reason)
        return len(claimed)

    def _task(self, name: str, batch_id: str) -> None:
        self.celery.send_task(name, kwargs={"batch_id": batch_id}, queue=keys.queue(4),
                              routing_key=keys.queue(4), argsrepr="()",
                              kwargsrepr=f"provider batch {batch_id}", ignore_result=True)

    # --- following the open ones ----------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Once a second: read the open provider batches; send the task of each one due."""
        if now - self._last_sweep < SWEEP_EVERY_S:
            return
        self._last_sweep = now
        self.open = self.lanes.open()
        listed = self.queue.lane_open()
        stale = [b for b, at in listed.items() if now - at > 60.0]
        if stale:  # claimed and never recorded (the reconciler put their jobs back)
            recorded = {b.id for b in self.open}
            for batch_id in stale:
                if batch_id not in recorded:
                    self.queue.lane_closed(batch_id)
        for rec in self.open:
            if rec.next_at > now:
                continue
            self._task(LANE_SUBMIT if rec.state == "creating" else LANE_POLL, rec.id)
            self.lanes.due(rec.id, next_due(rec, now, self.settings),
                           polled=rec.state == "submitted")

    def on_cancelled(self, job_ids: Sequence[str]) -> None:
        """Cancelled jobs: a provider batch that held one is looked at now."""
        if not self.open or not job_ids:
            return
        batches = {b for _, b in self.queue.states_and_batches(job_ids) if b}
        for rec in self.open:
            if rec.id in batches and rec.state == "submitted":
                # A second later: the canceller records its result in SQL meanwhile.
                self.lanes.due(rec.id, time.time() + 1.0)
                self._last_sweep = 0.0

    def overview(self, now: float) -> dict[str, Any]:
        """What ``promptbatch status`` and the metrics show of the lane."""
        oldest = self.pending.oldest()
        per: dict[str, dict[str, float]] = {}
        for b in self.open:
            row = per.setdefault(b.deployment, {"open": 0, "jobs": 0, "oldest_s": 0.0})
            row["open"] += 1
            row["jobs"] += b.jobs
            row["oldest_s"] = max(row["oldest_s"], round(now - b.created_at, 1))
        return {"waiting": len(self.pending), "deployments": per,
                "waiting_oldest_s": None if oldest is None else round(now - oldest, 1),
                "open": len(self.open), "jobs": sum(b.jobs for b in self.open),
                "batches": [b.public(now) for b in self.open[:SHOWN]]}

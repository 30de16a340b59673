"""Retention: what the job store keeps, and for how long.

Final jobs (with their results and idempotency keys), Batch API records and files older
than ``retention_days`` are deleted in bounded pages: ``PAGE`` rows of one table per
statement, oldest first, each an index range (``ix_jobs_finished``, ``ix_batches_created``,
``ix_files_created``), so a page costs the same in a table of a thousand rows or of a
hundred million. The active scheduler runs a few pages between its ticks
(``Retention.step``); ``promptbatch purge --older-than DAYS`` runs them all at once.

What stays: jobs not yet final (whatever their age), a Batch API record whose completion
window is still open, and API keys. A result leaves Redis on its own (``result_ttl_s``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import column, delete, select, table

from jobs.store import JobRow, JobStore

log = logging.getLogger(__name__)

#: Rows deleted per statement.
PAGE = 1000
#: Batch API records read per page (each is parsed: its completion window must be over).
BATCH_PAGE = 100
_BATCHES = table("batches", column("id"), column("created_at"), column("data"))
_FILES = table("files", column("id"), column("created_at"))


@dataclass
class Purged:
    """Rows deleted, per table."""

    jobs: int = 0
    batches: int = 0
    files: int = 0

    def __iadd__(self, other: Purged) -> Purged:
        self.jobs += other.jobs
        self.batches += other.batches
        self.files += other.files
        return self

    def __bool__(self) -> bool:
        return bool(self.jobs or self.batches or self.files)


def purge_page(store: JobStore, cutoff: float, now: float, *, limit: int = PAGE) -> Purged:
    """Delete one page of each table's rows older than ``cutoff`` (Unix time); a page
    with nothing left to delete deletes nothing. Returns what went."""
    out = Purged()
    with store.engine.begin() as conn:
        # A row has a finish time once final: one range of ix_jobs_finished (a filter on
        # the state would make SQLite scan every final row and sort them).
        oldest = (select(JobRow.id).where(JobRow.finished_at < cutoff)
                  .order_by(JobRow.finished_at, JobRow.id).limit(limit))
        ids = [r[0] for r in conn.execute(oldest)]
        if ids:
            out.jobs = conn.execute(delete(JobRow).where(JobRow.id.in_(ids))).rowcount
        rows = conn.execute(select(_BATCHES.c.id, _BATCHES.c.data)
                            .where(_BATCHES.c.created_at < cutoff)
                            .order_by(_BATCHES.c.created_at).limit(BATCH_PAGE)).all()
        done = [str(r[0]) for r in rows if _batch_over(str(r[1]), now)]
        if done:
            out.batches = conn.execute(delete(_BATCHES).where(_BATCHES.c.id.in_(done))).rowcount
        files = [r[0] for r in conn.execute(select(_FILES.c.id)
                                            .where(_FILES.c.created_at < cutoff)
                                            .order_by(_FILES.c.created_at).limit(limit))]
        if files:
            out.files = conn.execute(delete(_FILES).where(_FILES.c.id.in_(files))).rowcount
    return out


def _batch_over(data: str, now: float) -> bool:
    """Whether a Batch API record may go: its jobs are final, or its window is over."""
    try:
        record = json.loads(data)
    except ValueError:
        return True
    status = record.get("status")
    return status not in ("validating", "in_progress", "finalizing", "cancelling") or float(
        record.get("expires_at") or 0) < now


def purge_older_than(store: JobStore, days: float, now: float | None = None,
                     on_page: Callable[[Purged], None] | None = None) -> Purged:
    """Delete everything past ``days`` (page by page, until a page finds nothing)."""
    now = time.time() if now is None else now
    cutoff = now - days * 86400.0
    total = Purged()
    while True:
        page = purge_page(store, cutoff, now)
        if not page:
            return total
        total += page
        if on_page is not None:
            on_page(page)


class Retention:
    """The active scheduler's share of retention: a few pages between ticks."""

    def __init__(self, store: JobStore, days: float, interval_s: float) -> None:
        self.store = store
        self.days = days
        self.interval_s = interval_s
        self.next_at = 0.0
        #: Rows deleted since the process started.
        self.total = Purged()

    def due(self, now: float) -> bool:
        return self.days > 0 and now >= self.next_at

    def step(self, now: float, budget_s: float) -> Purged:
        """Delete pages for about ``budget_s`` seconds (at least one page). Once a page
        finds nothing, the next look is ``interval_s`` away."""
        cutoff = now - self.days * 86400.0
        until = time.monotonic() + budget_s
        done = Purged()
        while True:
            page = purge_page(self.store, cutoff, now)
            done += page
            if not page:
                self.next_at = now + self.interval_s
                break
            if time.monotonic() >= until:
                break
        self.total += done
        if done:
            log.info("retention: deleted %d jobs, %d batch records and %d files older than "
                     "%g days", done.jobs, done.batches, done.files, self.days)
        return done

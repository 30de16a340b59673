"""Retention: what the job store keeps, and for how long.

Final jobs (with their results and idempotency keys), Batch API records and files older
than ``retention_days``, and the records of provider batches (the half-price lane) closed
longer ago than that, are deleted in bounded pages: up to ``PAGE`` rows of each table
per page, oldest first, each an index range (``ix_jobs_finished``, ``ix_batches_created``,
``ix_files_created``, ``ix_provider_batches_created``) that goes on after the last row
the previous page looked at, so a
page costs the same in a table of a thousand rows or of a hundred million, and rows kept
never hold up the rows after them. The active scheduler runs a few pages between its
ticks (``Retention.step``); ``promptbatch purge --older-than DAYS`` runs a whole pass.

What stays: jobs not yet final (whatever their age), API keys, and what a Batch API batch
that is still open needs, whatever its age: its record, its input file, the listing of
its jobs and its jobs (final ones too: the output file is written from their results when
the last one ends). A batch is open until its record says it is final, or, for a batch
nobody has asked about since its window closed, until ``retention_days`` after that (its
jobs' deadline is the window, so by then every one of them ended that long ago): a
completion window longer than the retention period delays these rows, never breaks the
batch. A provider batch not yet closed stays, whatever its age: the scheduler follows it
from its record. A result leaves Redis on its own (``result_ttl_s``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, column, delete, select, table, tuple_

from jobs.store import JobRow, JobStore

log = logging.getLogger(__name__)

#: Rows looked at per table and page.
PAGE = 1000
#: Batch API records read per page (each is parsed: it goes only once it is over).
BATCH_PAGE = 100
#: Batch API states that still change (a batch in one of them is open).
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
#: The batch a Batch API job belongs to, from its idempotency key ``{batch id}:{custom id}``.
_JOB_KEY = re.compile(r"(batch_[0-9a-f]{32}):")
#: The batch whose job listing a ``batch_jobs`` file is (its name ``{batch id}_jobs.jsonl``).
_LISTING = re.compile(r"(batch_[0-9a-f]{32})_jobs\.jsonl")
_BATCHES = table("batches", column("id"), column("tenant"), column("created_at"),
                 column("data"), column("input_file_id"))
_FILES = table("files", column("id"), column("tenant"), column("purpose"),
               column("filename"), column("created_at"))
_PROVIDER_BATCHES = table("provider_batches", column("id"), column("state"),
                          column("created_at"), column("closed_at"))


@dataclass
class Purged:
    """Rows deleted per table; rows past the period kept for open batches; rows looked at
    (a pass is over when a page looks at none)."""

    jobs: int = 0
    batches: int = 0
    files: int = 0
    provider_batches: int = 0
    kept: int = 0
    seen: int = 0

    def __iadd__(self, other: Purged) -> Purged:
        self.jobs += other.jobs
        self.batches += other.batches
        self.files += other.files
        self.provider_batches += other.provider_batches
        self.kept += other.kept
        self.seen += other.seen
        return self

    def __bool__(self) -> bool:
        """Whether anything was deleted."""
        return bool(self.jobs or self.batches or self.files or self.provider_batches)


@dataclass
class Cursor:
    """Where a pass is in each table: ``(time, id)`` of the last row looked at (the rows
    before it were deleted, or kept for an open batch); None: at the start."""

    jobs: tuple[float, str] | None = None
    batches: tuple[float, str] | None = None
    files: tuple[float, str] | None = None
    provider_batches: tuple[float, str] | None = None
    #: The pass's rows kept so far.
    kept: int = field(default=0)


def _oldest(stmt: Any, at: Any, key: Any, cutoff: float,
            after: tuple[float, str] | None, limit: int) -> Any:
    """``stmt`` limited to rows older than ``cutoff`` after ``after``, oldest first: one
    range of the (time, id) index."""
    stmt = stmt.where(at < cutoff)
    if after is not None:
        stmt = stmt.where(tuple_(at, key) > tuple_(*after))
    return stmt.order_by(at, key).limit(limit)


def _holds(data: str, cutoff: float) -> bool:
    """Whether a Batch API record is of a batch still open: not final, and its window
    closed less than the retention period ago."""
    try:
        record = json.loads(data)
        return record.get("status") in OPEN and float(record.get("expires_at") or 0) >= cutoff
    except (ValueError, TypeError, AttributeError):
        return False


def _open_batches(conn: Connection, named: Iterable[tuple[str, str]], cutoff: float,
                  ) -> set[tuple[str, str]]:
    """Of ``(tenant, batch id)`` pairs, those of batches still open (primary key lookups)."""
    wanted = set(named)
    if not wanted:
        return set()
    rows = conn.execute(select(_BATCHES.c.id, _BATCHES.c.tenant, _BATCHES.c.data).where(
        _BATCHES.c.id.in_(sorted({b for _, b in wanted}))))
    return {(str(t), str(i)) for i, t, data in rows
            if (str(t), str(i)) in wanted and _holds(str(data), cutoff)}


def _files_in_use(conn: Connection, files: Iterable[tuple[str, str]], cutoff: float,
                  ) -> set[tuple[str, str]]:
    """Of ``(tenant, file id)`` pairs, the input files of batches still open (lookups of
    ``ix_batches_input_file``)."""
    wanted = set(files)
    if not wanted:
        return set()
    rows = conn.execute(select(_BATCHES.c.input_file_id, _BATCHES.c.tenant, _BATCHES.c.data)
                        .where(_BATCHES.c.input_file_id.in_(sorted({f for _, f in wanted}))))
    return {(str(t), str(f)) for f, t, data in rows
            if (str(t), str(f)) in wanted and _holds(str(data), cutoff)}


def _jobs_page(conn: Connection, cutoff: float, cursor: Cursor, limit: int, out: Purged,
               ) -> None:
    # A row has a finish time once final: one range of ix_jobs_finished (a filter on the
    # state would make SQLite scan every final row and sort them).
    rows = conn.execute(_oldest(
        select(JobRow.id, JobRow.tenant, JobRow.idempotency_key, JobRow.finished_at),
        JobRow.finished_at, JobRow.id, cutoff, cursor.jobs, limit)).all()
    if not rows:
        return
    cursor.jobs = (float(rows[-1][3]), str(rows[-1][0]))
    batch_of = {}
    for job_id, tenant, key, _ in rows:
        found = _JOB_KEY.match(key or "")
        if found:
            batch_of[job_id] = (str(tenant), found.group(1))
    held = _open_batches(conn, batch_of.values(), cutoff)
    gone = [r[0] for r in rows if batch_of.get(r[0]) not in held]
    out.seen += len(rows)
    out.kept += len(rows) - len(gone)
    if gone:
        out.jobs = conn.execute(delete(JobRow).where(JobRow.id.in_(gone))).rowcount


def _batches_page(conn: Connection, cutoff: float, cursor: Cursor, out: Purged) -> None:
    rows = conn.execute(_oldest(
        select(_BATCHES.c.id, _BATCHES.c.data, _BATCHES.c.created_at),
        _BATCHES.c.created_at, _BATCHES.c.id, cutoff, cursor.batches, BATCH_PAGE)).all()
    if not rows:
        return
    cursor.batches = (float(rows[-1][2]), str(rows[-1][0]))
    gone = [str(r[0]) for r in rows if not _holds(str(r[1]), cutoff)]
    out.seen += len(rows)
    out.kept += len(rows) - len(gone)
    if gone:
        out.batches = conn.execute(delete(_BATCHES).where(_BATCHES.c.id.in_(gone))).rowcount


def _files_page(conn: Connection, cutoff: float, cursor: Cursor, limit: int, out: Purged,
                ) -> None:
    rows = conn.execute(_oldest(
        select(_FILES.c.id, _FILES.c.tenant, _FILES.c.purpose, _FILES.c.filename,
               _FILES.c.created_at),
        _FILES.c.created_at, _FILES.c.id, cutoff, cursor.files, limit)).all()
    if not rows:
        return
    cursor.files = (float(rows[-1][4]), str(rows[-1][0]))
    listing_of: dict[str, tuple[str, str]] = {}  # file id -> (tenant, batch id)
    inputs: list[tuple[str, str]] = []  # (tenant, file id)
    for file_id, tenant, purpose, filename, _ in rows:
        found = _LISTING.fullmatch(str(filename)) if purpose == "batch_jobs" else None
        if found:
            listing_of[str(file_id)] = (str(tenant), found.group(1))
        elif purpose == "batch":
            inputs.append((str(tenant), str(file_id)))
    open_listings = _open_batches(conn, listing_of.values(), cutoff)
    in_use = _files_in_use(conn, inputs, cutoff)
    gone = [str(f) for f, t, *_ in rows
            if listing_of.get(str(f)) not in open_listings and (str(t), str(f)) not in in_use]
    out.seen += len(rows)
    out.kept += len(rows) - len(gone)
    if gone:
        out.files = conn.execute(delete(_FILES).where(_FILES.c.id.in_(gone))).rowcount


def _provider_batches_page(conn: Connection, cutoff: float, cursor: Cursor, limit: int,
                           out: Purged) -> None:
    """Provider batches created before ``cutoff`` (one range of
    ``ix_provider_batches_created``): those closed before it go; open ones stay (kept)."""
    pb = _PROVIDER_BATCHES.c
    rows = conn.execute(_oldest(select(pb.id, pb.state, pb.closed_at, pb.created_at),
                                pb.created_at, pb.id, cutoff, cursor.provider_batches,
                                limit)).all()
    if not rows:
        return
    cursor.provider_batches = (float(rows[-1][3]), str(rows[-1][0]))
    gone = [str(i) for i, state, closed_at, _ in rows
            if state == "closed" and closed_at is not None and float(closed_at) < cutoff]
    out.seen += len(rows)
    out.kept += sum(state != "closed" for _, state, _, _ in rows)
    if gone:
        out.provider_batches = conn.execute(
            delete(_PROVIDER_BATCHES).where(pb.id.in_(gone))).rowcount


def purge_page(store: JobStore, cutoff: float, *, cursor: Cursor | None = None,
               limit: int = PAGE) -> Purged:
    """Look at one page of each table's rows older than ``cutoff`` (Unix time) after
    ``cursor`` (which moves on past them), and delete those no open batch needs. Returns
    what went, what was kept and how many rows were looked at."""
    cursor = Cursor() if cursor is None else cursor
    out = Purged()
    with store.engine.begin() as conn:
        _jobs_page(conn, cutoff, cursor, limit, out)
        _batches_page(conn, cutoff, cursor, out)
        _files_page(conn, cutoff, cursor, limit, out)
        _provider_batches_page(conn, cutoff, cursor, limit, out)
    cursor.kept += out.kept
    return out


def purge_older_than(store: JobStore, days: float, now: float | None = None,
                     on_page: Callable[[Purged], None] | None = None) -> Purged:
    """One whole pass: delete everything past ``days`` that no open batch needs."""
    now = time.time() if now is None else now
    cutoff = now - days * 86400.0
    cursor = Cursor()
    total = Purged()
    while True:
        page = purge_page(store, cutoff, cursor=cursor)
        if not page.seen:
            return total
        total += page
        if on_page is not None and page:
            on_page(page)


class Retention:
    """The active scheduler's share of retention: a few pages between ticks."""

    def __init__(self, store: JobStore, days: float, interval_s: float) -> None:
        self.store = store
        self.days = days
        self.interval_s = interval_s
        self.next_at = 0.0
        self.cursor = Cursor()
        #: Rows deleted since the process started.
        self.total = Purged()

    def due(self, now: float) -> bool:
        return self.days > 0 and now >= self.next_at

    def step(self, now: float, budget_s: float) -> Purged:
        """Delete pages for about ``budget_s`` seconds (at least one page), going on from
        where the previous step stopped. Once a page finds nothing more, the pass is over
        and the next one starts ``interval_s`` away."""
        cutoff = now - self.days * 86400.0
        until = time.monotonic() + budget_s
        done = Purged()
        while True:
            page = purge_page(self.store, cutoff, cursor=self.cursor)
            done += page
            if not page.seen:
                if self.cursor.kept:
                    log.info("retention: kept %d rows past %g days for Batch API batches "
                             "and provider batches still open", self.cursor.kept, self.days)
                self.cursor = Cursor()
                self.next_at = now + self.interval_s
                break
            if time.monotonic() >= until:
                break
        self.total += done
        if done:
            log.info("retention: deleted %d jobs, %d batch records, %d files and %d closed "
                     "provider batches older than %g days", done.jobs, done.batches,
                     done.files, done.provider_batches, self.days)
        return done

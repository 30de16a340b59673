"""The records of provider batches (the half-price lane) in the SQL store.

A provider batch is a batch of jobs sent through a provider's own batch endpoint. Its
record is ours: written by the scheduler, in one transaction with its jobs' rows
(``AT_PROVIDER``, the batch's id), before anything is uploaded, so that a crash at any
point neither uploads it twice nor loses it. Its states:

* ``creating``: recorded, its upload not confirmed. The upload's worker takes an attempt
  (``begin_attempt``: one at a time, a stale one taken over) and, before uploading,
  asks the provider whether an earlier attempt created it already.
* ``submitted``: the provider holds it (``provider_batch_id``); it is polled, with
  backoff, one request per batch.
* ``ended``: the provider says it ended; its results are being recorded.
* ``closed``: every job has its outcome (recorded, or sent back to the fast path); the
  record stays (one small row per provider batch).

Jobs leave ``AT_PROVIDER`` when their result is recorded (the one result path) or when
they go back to the fast path (``return_jobs``: ``QUEUED``, their spec's lane "fast").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Float,
    Index,
    Integer,
    String,
    Text,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from jobs.models import FINAL_STATES, JobSpec, JobState
from jobs.store import Base, JobRow, JobStore

#: Record states that still change.
OPEN_STATES = ("creating", "submitted", "ended")
#: Job ids updated per statement.
CHUNK = 500
_FINAL = tuple(s.value for s in FINAL_STATES)
#: The jobs waiting at a provider, as the partial index ``ix_jobs_at_provider`` is
#: written (a literal: a bound parameter would keep SQLite from using that index).
_WAITING = text("jobs.state = 'AT_PROVIDER'")


class ProviderBatchRow(Base):
    """One provider batch (ours: its id is the jobs' ``batch_id``)."""

    __tablename__ = "provider_batches"
    __table_args__ = (Index("ix_provider_batches_state", "state", "next_at"),
                      Index("ix_provider_batches_created", "created_at", "id"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    jobs: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    #: When the scheduler next sends its task (upload, poll, results).
    next_at: Mapped[float] = mapped_column(Float)
    polls: Mapped[int] = mapped_column(Integer, default=0)
    provider_batch_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    input_file_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: The upload attempt under way (its token; None when none is) and when the last one
    #: began (an attempt that began may have created the batch before it died).
    attempt_token: Mapped[str | None] = mapped_column(String(36), nullable=True)
    attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    submitted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancel_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The provider's own status and request counts (JSON), as last polled.
    provider_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    counts: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


@dataclass(frozen=True, slots=True)
class ProviderBatch:
    """A provider batch's record."""

    id: str
    deployment: str
    state: str
    jobs: int
    created_at: float
    next_at: float
    polls: int = 0
    provider_batch_id: str | None = None
    input_file_id: str | None = None
    attempt_token: str | None = None
    attempt_at: float | None = None
    submitted_at: float | None = None
    ended_at: float | None = None
    closed_at: float | None = None
    cancel_at: float | None = None
    provider_status: str | None = None
    counts: str | None = None
    error: str | None = None

    @property
    def provider(self) -> str:
        return self.deployment.split("|", 1)[0]

    @property
    def model(self) -> str:
        return self.deployment.split("|", 1)[1]

    def public(self, now: float) -> dict[str, Any]:
        """What ``promptbatch status`` shows of it."""
        return {"id": self.id, "deployment": self.deployment, "state": self.state,
                "jobs": self.jobs, "age_s": round(max(0.0, now - self.created_at), 1),
                "provider_batch_id": self.provider_batch_id,
                "provider_status": self.provider_status, "polls": self.polls,
                "counts": json.loads(self.counts) if self.counts else None}


def _batch(row: Any) -> ProviderBatch:
    return ProviderBatch(**{k: row[k] for k in ProviderBatch.__slots__})


class ProviderBatches:
    """Reads and writes of the ``provider_batches`` table and of its jobs' rows."""

    def __init__(self, store: JobStore) -> None:
        self.engine = store.engine

    # --- the scheduler --------------------------------------------------------------------

    def record(self, batch_id: str, deployment: str, job_ids: Sequence[str], now: float,
               next_at: float, between: Callable[[], None] | None = None) -> None:
        """Record a provider batch (``creating``) and its jobs (``AT_PROVIDER``, this
        batch), in one transaction. ``between``: called between chunks of the jobs'
        updates (the scheduler renews its lease there)."""
        with self.engine.begin() as conn:
            conn.execute(insert(ProviderBatchRow).values(
                id=batch_id, deployment=deployment, state="creating", jobs=len(job_ids),
                created_at=now, next_at=next_at, polls=0))
            for start in range(0, len(job_ids), CHUNK):
                conn.execute(update(JobRow).where(
                    JobRow.id.in_(job_ids[start:start + CHUNK]), JobRow.state.not_in(_FINAL))
                    .values(state=JobState.AT_PROVIDER.value, batch_id=batch_id))
                if between is not None:
                    between()

    def open(self) -> list[ProviderBatch]:
        """Every provider batch not yet closed, oldest first."""
        stmt = (select(ProviderBatchRow).where(ProviderBatchRow.state.in_(OPEN_STATES))
                .order_by(ProviderBatchRow.created_at))
        with self.engine.connect() as conn:
            return [_batch(r) for r in conn.execute(stmt).mappings()]

    def due(self, batch_id: str, next_at: float, *, polled: bool = False) -> None:
        """When its task is next sent (``polled``: one more poll counted)."""
        values: dict[str, Any] = {"next_at": next_at}
        if polled:
            values["polls"] = ProviderBatchRow.polls + 1
        with self.engine.begin() as conn:
            conn.execute(update(ProviderBatchRow).where(ProviderBatchRow.id == batch_id)
                         .values(**values))

    # --- the worker -----------------------------------------------------------------------

    def get(self, batch_id: str) -> ProviderBatch | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(ProviderBatchRow).where(
                ProviderBatchRow.id == batch_id)).mappings().first()
        return _batch(row) if row is not None else None

    def begin_attempt(self, batch_id: str, token: str, now: float,
                      stale_s: float) -> ProviderBatch | None:
        """Take the upload of a ``creating`` batch: the record as it was before (its
        ``attempt_at`` says whether an earlier attempt began), or None while another
        attempt (younger than ``stale_s``) has it, or once it is created."""
        before = self.get(batch_id)
        with self.engine.begin() as conn:
            done = conn.execute(update(ProviderBatchRow).where(
                ProviderBatchRow.id == batch_id, ProviderBatchRow.state == "creating",
                (ProviderBatchRow.attempt_token.is_(None))
                | (ProviderBatchRow.attempt_at < now - stale_s))
                .values(attempt_token=token, attempt_at=now)).rowcount
        return before if done else None

    def sending(self, batch_id: str, token: str, jobs: int) -> None:
        """How many requests this attempt sends (what an earlier attempt's batch is
        recognised by, should this one die before recording it)."""
        with self.engine.begin() as conn:
            conn.execute(update(ProviderBatchRow).where(
                ProviderBatchRow.id == batch_id, ProviderBatchRow.attempt_token == token)
                .values(jobs=jobs))

    def attempt_over(self, batch_id: str, token: str, next_at: float,
                     error: str | None = None) -> None:
        """The attempt failed for a transient reason: the next one may begin at
        ``next_at`` (its ``attempt_at`` stays: the next attempt first looks for a batch
        this one may have created)."""
        with self.engine.begin() as conn:
            conn.execute(update(ProviderBatchRow).where(
                ProviderBatchRow.id == batch_id, ProviderBatchRow.attempt_token == token)
                .values(attempt_token=None, next_at=next_at, error=error))

    def uploaded(self, batch_id: str, token: str, input_file_id: str) -> None:
        """The input file an attempt uploaded (used again by the next attempt)."""
        with self.engine.begin() as conn:
            conn.execute(update(ProviderBatchRow).where(
                ProviderBatchRow.id == batch_id, ProviderBatchRow.attempt_token == token)
                .values(input_file_id=input_file_id))

    def submitted(self, batch_id: str, token: str, provider_batch_id: str, now: float,
                  next_at: float) -> bool:
        """The provider holds the batch: whether this attempt (``token``) recorded it
        (False: another attempt took over, or recorded another id first)."""
        with self.engine.begin() as conn:
            return bool(conn.execute(update(ProviderBatchRow).where(
                ProviderBatchRow.id == batch_id, ProviderBatchRow.state == "creating",
                ProviderBatchRow.attempt_token == token)
                .values(state="submitted", provider_batch_id=provider_batch_id,
                        submitted_at=now, next_at=next_at)).rowcount)

    def known_ids(self, deployment: str) -> set[str]:
        """The provider's ids of every batch of ``deployment`` recorded (a batch found at
        the provider and not among them is no recorded batch's)."""
        stmt = select(ProviderBatchRow.provider_batch_id).where(
            ProviderBatchRow.deployment == deployment,
            ProviderBatchRow.provider_batch_id.is_not(None))
        with self.engine.connect() as conn:
            return {str(x) for x in conn.execute(stmt).scalars()}

    def polled(self, batch_id: str, status: str, counts: dict[str, int], *,
               ended: bool, now: float) -> None:
        """What the last poll said (``ended``: the provider finished with it)."""
        values: dict[str, Any] = {"provider_status": status[:32],
                                  "counts": json.dumps(counts, sort_keys=True)}
        if ended:
            values.update(state="ended", ended_at=now)
        with self.engine.begin() as conn:
            conn.execute(update(ProviderBatchRow).where(
                ProviderBatchRow.id == batch_id, ProviderBatchRow.state.in_(OPEN_STATES))
                .values(**values))

    def cancelling(self, batch_id: str, now: float) -> None:
        """The provider was asked to cancel it."""
        with self.engine.begin() as conn:
            conn.execute(update(ProviderBatchRow).where(ProviderBatchRow.id == batch_id)
                         .values(cancel_at=now))

    def close(self, batch_id: str, now: float, error: str | None = None) -> None:
        """Every job has its outcome."""
        with self.engine.begin() as conn:
            conn.execute(update(ProviderBatchRow).where(ProviderBatchRow.id == batch_id)
                         .values(state="closed", closed_at=now, error=error))

    # --- its jobs ---------------------------------------------------------------------------

    def waiting(self, batch_id: str) -> list[JobSpec]:
        """The batch's jobs still waiting at the provider (AT_PROVIDER, this batch)."""
        stmt = select(JobRow.spec).where(JobRow.batch_id == batch_id, _WAITING)
        with self.engine.connect() as conn:
            return [JobSpec.model_validate_json(s) for s in conn.execute(stmt).scalars()]

    def waiting_count(self, batch_id: str) -> int:
        """How many of the batch's jobs still wait at the provider."""
        stmt = select(func.count()).select_from(JobRow).where(JobRow.batch_id == batch_id,
                                                              _WAITING)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def return_jobs(self, batch_id: str, specs: Sequence[JobSpec]) -> list[str]:
        """Jobs of the batch go back to the fast path in the store: QUEUED, out of the
        batch, their spec (lane "fast") written; the ids changed (a job final already, or
        no longer the batch's, is left alone)."""
        moved: list[str] = []
        now = time.time()
        with self.engine.begin() as conn:
            for spec in specs:
                done = conn.execute(update(JobRow).where(
                    JobRow.id == spec.id, JobRow.batch_id == batch_id, _WAITING)
                    .values(state=JobState.QUEUED.value, batch_id=None, stored_at=now,
                            spec=spec.model_dump_json())).rowcount
                if done:
                    moved.append(spec.id)
        return moved


def test_fault(fault_file: Path | None, point: str) -> None:
    """The test hook ``batch_api_test_fault``: when the file names ``point``, remove it and
    end this process at once (a crash at that point of a provider batch's life)."""
    if fault_file is None:
        return
    try:
        named = fault_file.read_text(encoding="utf-8").strip()
    except OSError:
        return
    if named == point:
        fault_file.unlink(missing_ok=True)
        os._exit(86)

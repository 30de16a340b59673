"""The SQL store's tables and its engine (SQLAlchemy 2.x): the schema that migrations
build (``jobs/migrations``), and how a connection is made for SQLite or PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class JobRow(Base):
    """One accepted job."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idem"),
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
        Index("ix_jobs_state_id", "state", "id"),
        Index("ix_jobs_finished", "finished_at", "id"),
        Index("ix_jobs_tenant_client", "tenant", "client_id"),
        Index("ix_jobs_client", "client_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    client_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    spec: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float | None] = mapped_column(Float, nullable=True)
    batch_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: When the row was written (a long submit writes its rows well after its jobs'
    #: ``created_at``): the reconciler's grace counts from here.
    stored_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The digest of the request an idempotency key was first used with.
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: The API key that submitted the job (its shown prefix; None: not through the API).
    api_key: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: The estimated cost reserved against budgets at submit, and which: ``t`` the
    #: tenant's, ``k`` the key's (released when the job ends).
    reserved_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    reserved_in: Mapped[str | None] = mapped_column(String(4), nullable=True)


class StoreMetaRow(Base):
    """Facts about the store itself (``store_id``: its identity)."""

    __tablename__ = "store_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class SpendRow(Base):
    """What one tenant's key spent on one deployment in one day (UTC), summed over the
    jobs that ended that day; written with each job's final result."""

    __tablename__ = "spend"
    __table_args__ = (Index("ix_spend_tenant_day", "tenant", "day"),)

    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The submitting key's prefix ('' for jobs not submitted through the API).
    api_key: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    jobs: Mapped[int] = mapped_column(Integer, default=0)
    #: Jobs with a provider call but no price (their cost is unknown, not 0).
    unpriced: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)


class SavingsRow(Base):
    """What one tenant's key did not pay on one deployment in one day, by reason."""

    __tablename__ = "savings"
    __table_args__ = (Index("ix_savings_tenant_day", "tenant", "day"),)

    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: exact_cache, coalesced, semantic_cache, prefix_cache, batch_discount.
    reason: Mapped[str] = mapped_column(String(16), primary_key=True)
    jobs: Mapped[int] = mapped_column(Integer, default=0)
    saved_usd: Mapped[float] = mapped_column(Float, default=0.0)


class BudgetRow(Base):
    """A tenant's or a key's budget, with what was spent in its current period and what
    the jobs still running reserved."""

    __tablename__ = "budgets"

    #: ``tenant`` or ``key``.
    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    #: The tenant, or the key's prefix.
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    limit_usd: Mapped[float] = mapped_column(Float)
    #: ``day``, ``month`` (UTC) or ``none`` (never resets).
    period: Mapped[str] = mapped_column(String(8))
    #: The period ``spent_usd`` is of (``2026-12-06``, ``2026-12``, ``none``).
    period_key: Mapped[str] = mapped_column(String(10))
    spent_usd: Mapped[float] = mapped_column(Float, default=0.0)
    reserved_usd: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float)


JOBS: Table = JobRow.__table__  # type: ignore[assignment]
SPEND: Table = SpendRow.__table__  # type: ignore[assignment]
SAVINGS: Table = SavingsRow.__table__  # type: ignore[assignment]
BUDGETS: Table = BudgetRow.__table__  # type: ignore[assignment]


#: Results written per UPDATE statement.


def make_engine(database_url: str, busy_timeout_s: float = 30.0, *, pool_size: int = 5,
                max_overflow: int = 10, statement_timeout_s: float = 30.0) -> Engine:
    """An engine for ``database_url``.

    SQLite: the file's folder is created, WAL is on, and a locked database is waited for
    ``busy_timeout_s`` at most. PostgreSQL: a pool of ``pool_size`` connections (plus
    ``max_overflow``) per process, connections checked before use (a restarted server
    costs one failed query, not a broken pool), connecting waits ``busy_timeout_s`` at
    most and a statement ``statement_timeout_s``.
    """
    if database_url.startswith("sqlite:///") and database_url != "sqlite:///:memory:":
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if database_url.startswith("postgresql"):
        engine = create_engine(
            database_url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow,
            pool_timeout=max(busy_timeout_s, 1.0), pool_recycle=1800,
            connect_args={"connect_timeout": max(1, int(busy_timeout_s)),
                          "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}",
                          "application_name": "promptbatch"})
        return engine
    engine = create_engine(database_url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        def pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            _wal(cur, busy_timeout_s)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        event.listen(engine, "connect", pragmas)
    return engine


def _wal(cur: Any, timeout_s: float) -> None:
    """Switch a SQLite database to WAL. The switch takes a lock that another process
    opening the same fresh file may hold for a moment, and SQLite answers "database is
    locked" at once rather than waiting: try again for up to ``timeout_s``."""
    import sqlite3

    until = time.monotonic() + timeout_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > until:
                raise
            time.sleep(0.01)

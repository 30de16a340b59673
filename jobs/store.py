"""The SQL job store: the durable record of every accepted job (SQLAlchemy 2.x).

Redis holds what is in motion; this store holds what must survive: every job from the
moment it is accepted, and its one final result. A final state is written with a
conditional UPDATE, so the first result wins here as it does in Redis.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from config.settings import Settings
from jobs import budgets, ledger
from jobs.errors import AmbiguousJob
from jobs.idempotency import first_of_each_key, holders
from jobs.models import FINAL_STATES, JobResult, JobSpec, JobState
from jobs.tables import JOBS, Base, JobRow, StoreMetaRow, make_engine

log = logging.getLogger(__name__)

_FINAL = tuple(s.value for s in FINAL_STATES)

FINALIZE_CHUNK = 200
#: Tries of an insert whose idempotency keys a concurrent submit keeps taking.
INSERT_ATTEMPTS = 5


def _finalize_many(results: Sequence[JobResult], mark: str,
                   dumped: Mapping[str, str] | None = None) -> tuple[str, tuple[Any, ...]]:
    """UPDATE jobs SET state/result/finished_at/batch_id = CASE id ... for the jobs not yet
    final, RETURNING the ids it changed, with the driver's own positional parameters
    (``mark``: ``?`` or ``%s``). Run through the driver: SQLAlchemy's parsing of a text
    statement's named parameters cost several times the UPDATE itself (250 us a job).
    ``dumped``: results' JSON the caller has already."""
    ids = [r.id for r in results]
    when = " ".join(f"WHEN {mark} THEN {mark}" for _ in results)
    keep = " ".join(f"WHEN {mark} THEN COALESCE({mark}, batch_id)" for _ in results)
    final = ", ".join(f"'{state}'" for state in sorted(_FINAL))
    sql = (f"UPDATE jobs SET state = CASE id {when} END, result = CASE id {when} END, "
           f"finished_at = CASE id {when} END, batch_id = CASE id {keep} END "
           f"WHERE id IN ({', '.join(mark for _ in results)}) AND state NOT IN ({final}) "
           "RETURNING id, tenant, api_key, reserved_usd, reserved_in")
    params: list[Any] = []
    texts = [(dumped.get(r.id) if dumped else None) or r.model_dump_json() for r in results]
    for column in ([r.state.value for r in results], texts,
                   [r.finished_at for r in results], [r.batch_id for r in results]):
        for job_id, value in zip(ids, column, strict=True):
            params += (job_id, value)
    return sql, (*params, *ids)


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job as the store holds it."""

    spec: JobSpec
    state: JobState
    result: JobResult | None

class JobStore:
    """Reads and writes of the ``jobs`` table."""

    @classmethod
    def for_settings(cls, settings: Settings, *, timeout_s: float | None = None) -> JobStore:
        """The store of ``settings`` with its pool and timeouts; ``timeout_s`` (the API's
        dependency timeout) bounds connecting and each statement."""
        wait = timeout_s if timeout_s is not None else 30.0
        return cls(settings.database_url, wait, pool_size=settings.database_pool_size,
                   max_overflow=settings.database_max_overflow,
                   statement_timeout_s=timeout_s or settings.database_statement_timeout_s)

    def __init__(self, database_url: str, busy_timeout_s: float = 30.0, *,
                 pool_size: int = 5, max_overflow: int = 10,
                 statement_timeout_s: float = 30.0) -> None:
        self.database_url = database_url
        self.engine = make_engine(database_url, busy_timeout_s, pool_size=pool_size,
                                  max_overflow=max_overflow,
                                  statement_timeout_s=statement_timeout_s)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to call from many processes)."""
        from jobs.migrate import upgrade

        upgrade(self.engine)

    @property
    def where(self) -> str:
        """The database URL without its password (for messages)."""
        return self.engine.url.render_as_string(hide_password=True)

    def check_schema(self) -> None:
        """Raise ``SchemaBehind`` unless the schema is at the newest revision."""
        from jobs.errors import SchemaBehind
        from jobs.migrate import current_revision, head_revision

        head = head_revision(self.engine)
        current = current_revision(self.engine)
        if current != head:
            raise SchemaBehind(self.where, current, head)

    def store_id(self) -> str:
        """The store's identity (written by the migrations)."""
        with self.engine.connect() as conn:
            found = conn.execute(select(StoreMetaRow.value).where(
                StoreMetaRow.key == "store_id")).scalar_one_or_none()
        if found is None:
            from jobs.errors import SchemaBehind
            from jobs.migrate import current_revision, head_revision

            raise SchemaBehind(self.where, current_revision(self.engine),
                               head_revision(self.engine))
        return str(found)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    # --- writes -------------------------------------------------------------------------

    def insert(self, specs: Sequence[JobSpec],
               final: Mapping[str, JobResult] | None = None,
               dumped: Mapping[str, str] | None = None,
               spec_json: Mapping[str, str] | None = None, *,
               api_key: str | None = None, holds: Mapping[str, float] | None = None,
               entries: Mapping[str, ledger.Entry] | None = None) -> dict[str, str]:
        """Insert new jobs as QUEUED (or, for those in ``final``, already ended with that
        result: answered from the cache; ``dumped``: their JSON, when the caller has it);
        return ``{id: stored id}``. ``spec_json``: the specs' JSON by id, when the caller
        has it (it goes to Redis too).

        Money, in the same transaction: ``api_key`` (the submitting key's prefix) is
        recorded on every job; ``holds`` (estimated costs by job id) are reserved against
        the budgets of the jobs' tenants and of the key (``BudgetExceeded``, and nothing
        written, when one would pass); ``entries`` (``jobs.ledger``) are the spend and
        savings of the jobs in ``final``.

        All or nothing: the new rows go in one transaction, or none does. A job whose
        (tenant, idempotency key) is already stored, or taken by an earlier job of the same
        call, is not inserted again: its entry maps to the id that holds the key. A key used
        again with another request raises ``IdempotencyConflict`` and writes nothing. A
        concurrent submit that takes one of the keys first makes the transaction fail
        whole; the keys are read again and the insert tried again.
        """
        firsts = first_of_each_key(specs)
        existing = self._existing_idempotent(specs)
        attempts = 0
        while True:
            mapping = holders(specs, firsts, existing)
            fresh = [s for s in specs if mapping[s.id] == s.id]
            if not fresh:
                return mapping
            rows = _rows(fresh, final, dumped, spec_json)
            try:
                with self.engine.begin() as conn:
                    # Locks in the order every writer takes them (spend rows, then the
                    # tenants' budgets, then the keys'), so none waits for another in a
                    # circle on PostgreSQL.
                    if final:
                        ledger.record(conn, {r["id"]: ledger.Owner(r["tenant"], api_key, None,
                                                                   None)
                                             for r in rows if r["id"] in final},
                                      entries or {})
                    if holds or api_key is not None:
                        _reserve(conn, rows, api_key, holds or {})
                    self._insert_rows(conn, rows)
                return mapping
            except IntegrityError:
                # A concurrent submit took one of the keys: nothing of this call was
                # written; read the keys again (a conflict with it raises above).
                attempts += 1
                again = self._existing_idempotent(specs)
                if again == existing or attempts >= INSERT_ATTEMPTS:
                    raise  # not a key taken meanwhile
                existing = again

    def _insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert rows that all have the same columns. On SQLite straight through the
        driver's ``executemany`` (SQLAlchemy's per-row parameter processing cost as much
        as SQLite's insert itself); elsewhere as SQLAlchemy batches it."""
        if self.engine.dialect.name != "sqlite":
            conn.execute(JOBS.insert(), rows)
            return
        cols = list(rows[0])
        sql = (f"INSERT INTO {JOBS.name} ({', '.join(cols)}) "
               f"VALUES ({', '.join('?' for _ in cols)})")
        conn.exec_driver_sql(sql, [tuple(row[c] for c in cols) for row in rows])

    def _existing_idempotent(self, specs: Sequence[JobSpec],
                             ) -> dict[tuple[str, str], tuple[str, str | None]]:
        """``(tenant, key) -> (job id, request digest)`` of the keys already stored."""
        by_tenant: dict[str, list[str]] = {}
        for s in specs:
            if s.idempotency_key:
                by_tenant.setdefault(s.tenant, []).append(s.idempotency_key)
        if not by_tenant:
            return {}
        found: dict[tuple[str, str], tuple[str, str | None]] = {}
        with self.engine.connect() as conn:
            for tenant, idem_keys in by_tenant.items():
                for chunk in _chunks(idem_keys, 500):
                    stmt = select(JobRow.id, JobRow.idempotency_key, JobRow.request_hash).where(
                        JobRow.tenant == tenant, JobRow.idempotency_key.in_(chunk))
                    for job_id, key, digest in conn.execute(stmt):
                        found[(tenant, str(key))] = (job_id, digest)
        return found

    def delete(self, job_ids: Iterable[str]) -> None:
        """Remove jobs that were never enqueued (undo of a failed submit), releasing what
        they reserved against budgets."""
        ids = list(job_ids)
        with self.engine.begin() as conn:
            held: dict[str, ledger.Owner] = {}
            for chunk in _chunks(ids, 500):
                for job_id, tenant, key, amount, where in conn.execute(
                        select(JobRow.id, JobRow.tenant, JobRow.api_key, JobRow.reserved_usd,
                               JobRow.reserved_in)
                        .where(JobRow.id.in_(chunk), JobRow.reserved_usd.is_not(None))):
                    held[job_id] = ledger.Owner(tenant, key, amount, where)
            if held:
                ledger.record(conn, held, {})
            for chunk in _chunks(ids, 500):
                conn.execute(JOBS.delete().where(JobRow.id.in_(chunk)))

    def finalize(self, results: Sequence[JobResult],
                 dumped: Mapping[str, str] | None = None,
                 entries: Mapping[str, ledger.Entry] | None = None) -> list[str]:
        """Store final results; return the ids whose result was stored by this call
        (``dumped``: the results' JSON by id, when the caller has it already).

        In the same transaction, for the jobs this call made final only: their spend and
        savings (``entries``, ``jobs.ledger``) and their budgets settled (reservations
        released, real cost added), so money is counted once, with the first result.

        A job that already has a final state keeps it (the first result wins). One
        conditional UPDATE per ``FINALIZE_CHUNK`` results (CASE by id, RETURNING the ids it
        changed), rows taken in id order, so concurrent writers (workers, the reconciler,
        a cancel) never deadlock on PostgreSQL and a batch costs one statement.
        """
        won: list[str] = []
        latest = {r.id: r for r in results}  # one result per job and call
        ordered = [latest[k] for k in sorted(latest)]
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        with self.engine.begin() as conn:
            owners: dict[str, ledger.Owner] = {}
            for chunk in _chunks(ordered, FINALIZE_CHUNK):
                sql, params = _finalize_many(chunk, mark, dumped)
                for job_id, tenant, key, held, held_in in conn.exec_driver_sql(sql, params):
                    won.append(job_id)
                    owners[job_id] = ledger.Owner(tenant, key, held, held_in)
            if owners and (entries or any(o.reserved_usd for o in owners.values())):
                ledger.record(conn, owners, entries or {})
        return won

    def set_state(self, job_ids: Sequence[str], state: JobState,
                  batch_id: str | None = None) -> None:
        """Record a non-final state (SCHEDULED, RUNNING) for jobs not yet final."""
        with self.engine.begin() as conn:
            for chunk in _chunks(list(job_ids), 500):
                values: dict[str, Any] = {"state": state.value}
                if batch_id is not None:
                    values["batch_id"] = batch_id
                conn.execute(update(JobRow).where(JobRow.id.in_(chunk),
                                                  JobRow.state.not_in(_FINAL)).values(**values))

    # --- reads --------------------------------------------------------------------------

    def get(self, job_id: str, tenant: str | None = None) -> StoredJob | None:
        """One job, or None when unknown (or, with ``tenant``, another tenant's)."""
        stmt = select(JobRow).where(JobRow.id == job_id)
        if tenant is not None:
            stmt = stmt.where(JobRow.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        return _stored(row) if row is not None else None

    def find(self, job_id: str, tenant: str | None = None) -> StoredJob | None:
        """A job by its id, or else by the caller's own id (``client_id``: the newest job
        with it), scoped to ``tenant`` when given. Unscoped (an admin, an operator), an id
        that several tenants use as their own raises ``AmbiguousJob`` naming them, rather
        than answering with one of theirs."""
        found = self.get(job_id, tenant)
        if found is not None:
            return found
        with self.engine.connect() as conn:
            if tenant is None:
                owners = sorted(str(t) for t in conn.execute(
                    select(JobRow.tenant).where(JobRow.client_id == job_id).distinct()
                    .limit(20)).scalars())
                if len(owners) > 1:
                    raise AmbiguousJob(job_id, owners)
            stmt = select(JobRow).where(JobRow.client_id == job_id)
            if tenant is not None:
                stmt = stmt.where(JobRow.tenant == tenant)
            stmt = stmt.order_by(JobRow.created_at.desc()).limit(1)
            row = conn.execute(stmt).mappings().first()
        return _stored(row) if row is not None else None

    def get_many(self, job_ids: Sequence[str]) -> dict[str, StoredJob]:
        """Jobs by id (unknown ids are left out)."""
        out: dict[str, StoredJob] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(job_ids), 500):
                for row in conn.execute(select(JobRow).where(JobRow.id.in_(chunk))).mappings():
                    out[row["id"]] = _stored(row)
        return out

    def list_jobs(self, tenant: str, *, state: JobState | None = None, limit: int = 100,
                  after: tuple[float, str] | None = None) -> list[StoredJob]:
        """A tenant's jobs, oldest first, after the cursor ``(created_at, id)``."""
        stmt = select(JobRow).where(JobRow.tenant == tenant)
        if state is not None:
            stmt = stmt.where(JobRow.state == state.value)
        if after is not None:
            created, job_id = after
            stmt = stmt.where((JobRow.created_at > created)
                              | ((JobRow.created_at == created) & (JobRow.id > job_id)))
        stmt = stmt.order_by(JobRow.created_at, JobRow.id).limit(limit)
        with self.engine.connect() as conn:
            return [_stored(r) for r in conn.execute(stmt).mappings()]

    def unfinished_page(self, state: JobState, *, after: str = "", limit: int = 1000,
                        ) -> list[tuple[str, str, float, float]]:
        """``(id, tenant, created_at, stored)`` of jobs in a non-final ``state``, by id,
        after ``after`` (the reconciler's pages: one index range each, whatever the table
        size); ``stored`` is when the row was written (``created_at`` for rows written
        before that was recorded)."""
        stmt = (select(JobRow.id, JobRow.tenant, JobRow.created_at, JobRow.stored_at)
                .where(JobRow.state == state.value, JobRow.id > after)
                .order_by(JobRow.id).limit(limit))
        with self.engine.connect() as conn:
            return [(r[0], r[1], r[2], r[3] if r[3] is not None else r[2])
                    for r in conn.execute(stmt)]

    def finished_page(self, since: float, *, after: tuple[float, str] = (0.0, ""),
                      limit: int = 1000) -> list[tuple[str, str, float]]:
        """``(id, tenant, finished_at)`` of jobs that finished at or after ``since``, by
        (finish time, id), after the cursor ``after`` (for writing results back to a result
        backend that lost them; one index range per page; the results themselves, which
        are rarely missing, through ``outcomes``)."""
        # One range of ix_jobs_finished: a row-value comparison (an OR of the two columns,
        # and a filter on the state, made SQLite scan every final row and sort them, for
        # every page: a pass over n rows cost n^2). A row has a finish time once final.
        stmt = (select(JobRow.id, JobRow.tenant, JobRow.finished_at)
                .where(JobRow.finished_at >= since,
                       tuple_(JobRow.finished_at, JobRow.id) > tuple_(*after))
                .order_by(JobRow.finished_at, JobRow.id).limit(limit))
        with self.engine.connect() as conn:
            return [(r[0], r[1], r[2] or 0.0) for r in conn.execute(stmt)]

    def owned(self, job_ids: Sequence[str], tenant: str | None) -> set[str]:
        """The ids of ``job_ids`` the store holds (of ``tenant``'s jobs, when given)."""
        out: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(list(job_ids), 500):
                stmt = select(JobRow.id).where(JobRow.id.in_(chunk))
                if tenant is not None:
                    stmt = stmt.where(JobRow.tenant == tenant)
                out.update(str(r[0]) for r in conn.execute(stmt))
        return out

    def outcomes(self, job_ids: Sequence[str]) -> dict[str, str | None]:
        """Each known job of ``job_ids``: its stored result JSON, or None while it has none
        (unknown ids are left out). Reads neither specs nor states: a waiting client's
        check of results that left Redis, and the reconciler's write-back of them."""
        out: dict[str, str | None] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(job_ids), 500):
                stmt = select(JobRow.id, JobRow.result).where(JobRow.id.in_(chunk))
                out.update((job_id, None if raw is None else str(raw))
                           for job_id, raw in conn.execute(stmt))
        return out

    def count_by_state(self) -> dict[str, int]:
        """Number of jobs per state."""
        from sqlalchemy import func

        stmt = select(JobRow.state, func.count()).group_by(JobRow.state)
        with self.engine.connect() as conn:
            return {state: n for state, n in conn.execute(stmt)}

    def ping(self) -> None:
        """Raise ``OperationalError`` unless the database answers."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def _rows(fresh: Sequence[JobSpec], final: Mapping[str, JobResult] | None,
          dumped: Mapping[str, str] | None,
          spec_json: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """The rows of new jobs, all with the same columns (one executemany); the ones in
    ``final`` already ended with their result."""
    now = time.time()
    rows = [_row(s, spec_json.get(s.id) if spec_json else None, now) for s in fresh]
    if final:
        for row in rows:
            row.update(result=None, finished_at=None, batch_id=None)
            res = final.get(row["id"])
            if res is not None:
                text = dumped.get(res.id) if dumped else None
                row.update(state=res.state.value, result=text or res.model_dump_json(),
                           finished_at=res.finished_at, batch_id=res.batch_id)
    return rows


def _reserve(conn: Connection, rows: list[dict[str, Any]], api_key: str | None,
             holds: Mapping[str, float]) -> None:
    """Record the submitting key on the new rows and reserve the estimated cost of the
    ones not final against their tenant's budget and the key's (in the insert's
    transaction: a refusal, ``BudgetExceeded``, writes nothing)."""
    now = time.time()
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        row.update(api_key=api_key, reserved_usd=None, reserved_in=None)
        if holds.get(row["id"], 0.0) > 0 and row["state"] == JobState.QUEUED.value:
            by_tenant.setdefault(row["tenant"], []).append(row)
    flags: dict[str, str] = {}
    for tenant, mine in sorted(by_tenant.items()):  # the tenants' budgets, then the key's
        amount = sum(holds[r["id"]] for r in mine)
        flags[tenant] = "t" if budgets.reserve(conn, "tenant", tenant, amount, now) else ""
    total = sum(holds[r["id"]] for mine in by_tenant.values() for r in mine)
    if api_key is not None and total and budgets.reserve(conn, "key", api_key, total, now):
        flags = {t: f + "k" for t, f in flags.items()}
    for tenant, mine in by_tenant.items():
        for r in mine:
            held = flags[tenant]
            r.update(reserved_usd=holds[r["id"]] if held else None, reserved_in=held or None)


def _row(spec: JobSpec, spec_json: str | None = None,
         stored_at: float | None = None) -> dict[str, Any]:
    return {
        "id": spec.id,
        "tenant": spec.tenant,
        "idempotency_key": spec.idempotency_key,
        "client_id": spec.client_id,
        "state": JobState.QUEUED.value,
        "priority": int(spec.priority),
        "provider": spec.provider,
        "model": spec.model,
        "spec": spec_json or spec.model_dump_json(),
        "created_at": spec.created_at,
        "deadline": spec.deadline,
        "stored_at": time.time() if stored_at is None else stored_at,
        "request_hash": spec.request_hash,
    }


def _stored(row: Any) -> StoredJob:
    result = JobResult.model_validate(json.loads(row["result"])) if row["result"] else None
    return StoredJob(spec=JobSpec.model_validate_json(row["spec"]), state=JobState(row["state"]),
                     result=result)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


__all__ = ["Base", "JobRow", "JobStore", "OperationalError", "StoreMetaRow", "StoredJob",
           "make_engine"]

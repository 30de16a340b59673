"""The spend ledger: what each tenant's key spent and saved per deployment and UTC day.

Written only in the SQL transaction that makes jobs final (``JobStore.finalize``, and
``JobStore.insert`` for the jobs the cache answers at submit), and only for the jobs that
transaction made final, so a job's money is counted once, by the first result, and a
query of the rows sums it (``totals``). The same transaction settles the jobs' budgets
(``jobs.budgets``). The daily rows are small and outlive the jobs (retention leaves them).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, select

from jobs import budgets
from jobs.costs import Charge
from jobs.models import JobResult
from jobs.tables import SAVINGS, SPEND

#: How ``totals`` groups spend: by day, by deployment, by key, or by tenant.
GROUPINGS = ("day", "deployment", "key", "tenant")


def day_of(at: float) -> str:
    """The UTC day of a time, as the ledger's rows name it."""
    t = time.gmtime(at)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One final job's money: its deployment, day, charge and (for a call of its own)
    tokens."""

    job_id: str
    provider: str
    model: str
    day: str
    charge: Charge
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0


def entry(result: JobResult, charge: Charge) -> Entry | None:
    """The ledger entry of a final result (None when the job made no call and saved
    nothing: there is nothing to count)."""
    u = result.usage
    if u is None and not charge.saved:
        return None
    at = result.finished_at or time.time()
    own = u is not None and result.cache is None
    return Entry(result.id, result.provider or "", result.model or "", day_of(at), charge,
                 u.prompt_tokens if own and u else 0, u.cached_tokens if own and u else 0,
                 u.cache_write_tokens if own and u else 0,
                 u.completion_tokens if own and u else 0)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who pays for a job: its tenant, its key, and what it reserved (``JobStore``'s
    RETURNING of the rows it made final)."""

    tenant: str
    api_key: str | None
    reserved_usd: float | None
    reserved_in: str | None


def record(conn: Connection, owners: Mapping[str, Owner], entries: Mapping[str, Entry],
           now: float | None = None) -> None:
    """Write the spend and savings of the jobs ``owners`` names (the ones the caller's
    transaction made final) and settle their budgets, in ``conn``'s transaction."""
    now = time.time() if now is None else now
    spend: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0] * 7)
    saved: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
    settle: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for job_id, owner in owners.items():
        e = entries.get(job_id)
        cost = (e.charge.cost or 0.0) if e is not None else 0.0
        for scope, flag, name in (("tenant", "t", owner.tenant),
                                  ("key", "k", owner.api_key)):
            if name is None:
                continue
            held = (owner.reserved_usd or 0.0) if flag in (owner.reserved_in or "") else 0.0
            if held or cost:
                s = settle[(scope, name)]
                s[0] += held
                s[1] += cost
        if e is None:
            continue
        key = (e.day, owner.tenant, owner.api_key or "", e.provider, e.model)
        row = spend[key]
        row[0] += 1
        if e.charge.cost is None and (e.prompt_tokens or e.completion_tokens):
            row[1] += 1  # a call without a price
        for i, n in enumerate((e.prompt_tokens, e.cached_tokens, e.cache_write_tokens,
                               e.completion_tokens), start=2):
            row[i] += n
        row[6] += cost
        for reason, usd in e.charge.saved.items():
            cell = saved[(*key, reason)]
            cell[0] += 1
            cell[1] += usd
    names = ("day", "tenant", "api_key", "provider", "model")
    _add(conn, SPEND, [{**dict(zip(names, k, strict=True)), "jobs": int(v[0]),
                        "unpriced": int(v[1]), "prompt_tokens": int(v[2]),
                        "cached_tokens": int(v[3]), "cache_write_tokens": int(v[4]),
                        "completion_tokens": int(v[5]), "cost_usd": v[6]}
                       for k, v in spend.items()])
    _add(conn, SAVINGS, [{**dict(zip((*names, "reason"), k, strict=True)), "jobs": int(v[0]),
                          "saved_usd": v[1]} for k, v in saved.items()])
    # The tenants' budgets, then the keys' (the order a submit reserves them in).
    for (scope, name), (held, cost) in sorted(settle.items(),
                                              key=lambda kv: (kv[0][0] != "tenant", kv[0])):
        budgets.settle(conn, scope, name, held, cost, now)


def _add(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows, or add their numbers to the rows with the same key (an upsert, on
    SQLite and on PostgreSQL)."""
    if not rows:
        return
    from sqlalchemy.dialects import postgresql, sqlite

    stmt: Any = (postgresql.insert(table) if conn.dialect.name == "postgresql"
                 else sqlite.insert(table))
    keys = [c.name for c in table.primary_key.columns]
    numbers = [c for c in rows[0] if c not in keys]
    stmt = stmt.on_conflict_do_update(index_elements=keys, set_={
        c: table.c[c] + getattr(stmt.excluded, c) for c in numbers})
    for row in sorted(rows, key=lambda r: tuple(r[k] for k in keys)):  # one lock order
        conn.execute(stmt, row)


@dataclass(frozen=True, slots=True)
class Total:
    """Spend and savings of one group (a day, a deployment, a key or a tenant)."""

    group: str
    jobs: int
    unpriced: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    saved_usd: dict[str, float]

    @property
    def saved_total(self) -> float:
        return sum(self.saved_usd.values())


def _group_columns(table: Table, by: str) -> list[Any]:
    if by == "day":
        return [table.c.day]
    if by == "deployment":
        return [table.c.provider, table.c.model]
    if by == "key":
        return [table.c.tenant, table.c.api_key]
    return [table.c.tenant]


def _label(by: str, values: Sequence[Any]) -> str:
    if by == "deployment":
        return f"{values[0]}|{values[1]}"
    if by == "key":
        return f"{values[0]} {values[1] or '(no key)'}"
    return str(values[0])


def totals(engine: Engine, *, by: str = "day", tenant: str | None = None,
           since: str | None = None, until: str | None = None) -> list[Total]:
    """Spend and savings summed per ``by`` (``GROUPINGS``), of ``tenant`` (else every
    tenant), for the days from ``since`` to ``until`` (``YYYY-MM-DD``, both included)."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, not {by!r}")

    def scoped(stmt: Any, table: Table) -> Any:
        if tenant is not None:
            stmt = stmt.where(table.c.tenant == tenant)
        if since is not None:
            stmt = stmt.where(table.c.day >= since)
        if until is not None:
            stmt = stmt.where(table.c.day <= until)
        return stmt

    cols = _group_columns(SPEND, by)
    spend = scoped(select(*cols, func.sum(SPEND.c.jobs), func.sum(SPEND.c.unpriced),
                          func.sum(SPEND.c.prompt_tokens), func.sum(SPEND.c.cached_tokens),
                          func.sum(SPEND.c.completion_tokens), func.sum(SPEND.c.cost_usd)),
                   SPEND).group_by(*cols)
    scols = _group_columns(SAVINGS, by)
    saved = scoped(select(*scols, SAVINGS.c.reason, func.sum(SAVINGS.c.saved_usd)),
                   SAVINGS).group_by(*scols, SAVINGS.c.reason)
    n = len(cols)
    out: dict[str, list[Any]] = {}
    with engine.connect() as conn:
        for row in conn.execute(spend):
            out[_label(by, row[:n])] = [*(int(v or 0) for v in row[n:n + 5]),
                                        float(row[n + 5] or 0.0), {}]
        for row in conn.execute(saved):
            cell = out.setdefault(_label(by, row[:n]), [0, 0, 0, 0, 0, 0.0, {}])
            cell[6][str(row[n])] = float(row[n + 1] or 0.0)
    return [Total(group, *values) for group, values in sorted(out.items())]


def spent_today(engine: Engine, now: float | None = None) -> dict[str, tuple[float, float]]:
    """Per tenant, today's (UTC) spend and savings."""
    day = day_of(time.time() if now is None else now)
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    with engine.connect() as conn:
        for tenant, cost in conn.execute(select(SPEND.c.tenant, func.sum(SPEND.c.cost_usd))
                                         .where(SPEND.c.day == day)
                                         .group_by(SPEND.c.tenant)):
            out[str(tenant)][0] += float(cost or 0.0)
        for tenant, usd in conn.execute(select(SAVINGS.c.tenant, func.sum(SAVINGS.c.saved_usd))
                                        .where(SAVINGS.c.day == day)
                                        .group_by(SAVINGS.c.tenant)):
            out[str(tenant)][1] += float(usd or 0.0)
    return {t: (v[0], v[1]) for t, v in sorted(out.items())}


def entries_of(pairs: Iterable[tuple[JobResult, Charge]]) -> dict[str, Entry]:
    """The ledger entries of priced results, by job id."""
    out: dict[str, Entry] = {}
    for result, charge in pairs:
        e = entry(result, charge)
        if e is not None:
            out[result.id] = e
    return out

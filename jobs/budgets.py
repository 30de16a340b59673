"""Budgets of tenants and API keys: a limit in US dollars per period (a UTC day, a UTC
month, or none: never resets), what was spent in the current period, and what the jobs
not yet finished reserved.

* **Reserve** at submit, in the transaction that inserts the jobs (``reserve``): one
  conditional UPDATE per budget, ``spent + reserved + estimate <= limit``, so two
  submits racing in two API processes cannot both take the last dollars (SQLite runs
  the writes one after another; PostgreSQL re-checks the condition on the row it waited
  for). A refusal raises ``BudgetExceeded`` and the transaction writes nothing.
* **Settle** in the transaction that makes the jobs final (``settle``, from
  ``jobs.ledger``): the reservation is released and the real cost added, whatever ended
  the job (a cancelled, expired or failed job without a call adds 0).

A budget's period rolls over in the statement that touches it first in a new period
(``spent`` starts again at 0; reservations stay with their jobs). A job already accepted
is never refused or stopped by a budget.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    case,
    delete,
    literal,
    select,
    update,
)

from jobs.errors import BudgetExceeded
from jobs.tables import BUDGETS, SPEND

PERIODS = ("day", "month", "none")
SCOPES = ("tenant", "key")
#: Rounding room in a budget's comparison (dollars).
EPSILON = 1e-9


def period_key(period: str, now: float) -> str:
    """The period ``now`` falls in: ``2026-12-06`` (day), ``2026-12`` (month), ``none``."""
    t = time.gmtime(now)
    if period == "day":
        return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
    if period == "month":
        return f"{t.tm_year:04d}-{t.tm_mon:02d}"
    return "none"


def period_start(period: str, now: float) -> str | None:
    """The first day (``YYYY-MM-DD``) of the period ``now`` falls in (None: no period)."""
    t = time.gmtime(now)
    if period == "day":
        return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
    if period == "month":
        return f"{t.tm_year:04d}-{t.tm_mon:02d}-01"
    return None


def resets_at(period: str, now: float) -> float | None:
    """When the period ``now`` falls in ends (a UTC midnight), None for no period."""
    t = time.gmtime(now)
    if period == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400.0
    if period == "month":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return float(calendar.timegm((year, month, 1, 0, 0, 0)))
    return None


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget as an operator sees it; ``spent_usd`` is of the current period."""

    scope: str
    name: str
    limit_usd: float
    period: str
    spent_usd: float
    reserved_usd: float
    resets_at: float | None


def _current(now: float) -> tuple[ColumnElement[str], ColumnElement[float]]:
    """SQL for "the row's period key now", and for "what it spent in it"."""
    key = case((BUDGETS.c.period == "day", literal(period_key("day", now))),
               (BUDGETS.c.period == "month", literal(period_key("month", now))),
               else_=literal("none"))
    spent = case((BUDGETS.c.period_key == key, BUDGETS.c.spent_usd), else_=literal(0.0))
    return key, spent


def reserve(conn: Connection, scope: str, name: str, amount: float, now: float) -> bool:
    """Reserve ``amount`` in the budget of ``scope`` ``name``; False when it has none;
    ``BudgetExceeded`` when it would pass it (the caller's transaction then rolls back)."""
    key, spent = _current(now)
    done = conn.execute(
        update(BUDGETS)
        .where(BUDGETS.c.scope == scope, BUDGETS.c.name == name,
               spent + BUDGETS.c.reserved_usd + amount <= BUDGETS.c.limit_usd + EPSILON)
        .values(spent_usd=spent, period_key=key,
                reserved_usd=BUDGETS.c.reserved_usd + amount, updated_at=now))
    if done.rowcount:
        return True
    row = conn.execute(select(BUDGETS.c.limit_usd, BUDGETS.c.period, spent,
                              BUDGETS.c.reserved_usd)
                       .where(BUDGETS.c.scope == scope, BUDGETS.c.name == name)).first()
    if row is None:
        return False
    limit, period, used, held = row
    raise BudgetExceeded(scope, name, float(limit), str(period), float(used), float(held),
                         amount, resets_at(str(period), now))


def settle(conn: Connection, scope: str, name: str, released: float, cost: float,
           now: float) -> None:
    """Release ``released`` of the budget's reservation and add ``cost`` to its spend in
    the current period (nothing when it has no budget)."""
    key, spent = _current(now)
    held = BUDGETS.c.reserved_usd - released
    conn.execute(update(BUDGETS)
                 .where(BUDGETS.c.scope == scope, BUDGETS.c.name == name)
                 .values(spent_usd=spent + cost, period_key=key,
                         reserved_usd=case((held > 0, held), else_=literal(0.0)),
                         updated_at=now))


def spent_in_period(conn: Connection, scope: str, name: str, period: str,
                    now: float) -> float:
    """What the spend rows hold for a tenant's or key's current period (a new budget
    starts from it)."""
    column = SPEND.c.tenant if scope == "tenant" else SPEND.c.api_key
    stmt = select(SPEND.c.cost_usd).where(column == name)
    first = period_start(period, now)
    if first is not None:
        stmt = stmt.where(SPEND.c.day >= first)
    return float(sum(v for (v,) in conn.execute(stmt)))


def set_budget(engine: Engine, scope: str, name: str, limit_usd: float, period: str,
               now: float | None = None) -> Budget:
    """Set (or change) a budget. A new one starts with what the spend rows hold for the
    current period; a changed one keeps its spend and reservations (a new period kind
    starts its spend from the rows)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
    if not limit_usd >= 0:
        raise ValueError(f"the budget must be 0 or more US dollars, not {limit_usd}")
    now = time.time() if now is None else now
    where = and_(BUDGETS.c.scope == scope, BUDGETS.c.name == name)
    with engine.begin() as conn:
        row = conn.execute(select(BUDGETS.c.period).where(where)).first()
        if row is not None and row[0] == period:
            conn.execute(update(BUDGETS).where(where).values(limit_usd=limit_usd,
                                                             updated_at=now))
        else:
            spent = spent_in_period(conn, scope, name, period, now)
            if row is None:
                conn.execute(BUDGETS.insert().values(
                    scope=scope, name=name, limit_usd=limit_usd, period=period,
                    period_key=period_key(period, now), spent_usd=spent, reserved_usd=0.0,
                    updated_at=now))
            else:
                conn.execute(update(BUDGETS).where(where).values(
                    limit_usd=limit_usd, period=period, period_key=period_key(period, now),
                    spent_usd=spent, updated_at=now))
    found = get_budgets(engine, scope, [name], now)
    return found[0]


def remove_budget(engine: Engine, scope: str, name: str) -> bool:
    """Remove a budget; whether there was one."""
    with engine.begin() as conn:
        done = conn.execute(delete(BUDGETS).where(BUDGETS.c.scope == scope,
                                                  BUDGETS.c.name == name))
    return bool(done.rowcount)


def get_budgets(engine: Engine, scope: str | None = None, names: Iterable[str] | None = None,
                now: float | None = None) -> list[Budget]:
    """Budgets (of ``scope``, named ``names``), with what they spent in the current
    period (0 for one not touched since its period rolled over)."""
    now = time.time() if now is None else now
    _, spent = _current(now)
    stmt = select(BUDGETS.c.scope, BUDGETS.c.name, BUDGETS.c.limit_usd, BUDGETS.c.period,
                  spent, BUDGETS.c.reserved_usd).order_by(BUDGETS.c.scope, BUDGETS.c.name)
    if scope is not None:
        stmt = stmt.where(BUDGETS.c.scope == scope)
    if names is not None:
        stmt = stmt.where(BUDGETS.c.name.in_(list(names)))
    with engine.connect() as conn:
        return [Budget(str(s), str(n), float(lim), str(p), float(used), float(held),
                       resets_at(str(p), now))
                for s, n, lim, p, used, held in conn.execute(stmt)]

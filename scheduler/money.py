"""Money as the active scheduler exports it: what was spent and saved (the counters the
result step keeps in Redis, ``jobs.stats.read_money``), each budget's limit and spend in
its period, and today's spend per tenant for ``promptbatch status`` (both from SQL, read
every ``MONEY_EVERY_S``: a query of small tables, not one per tick).

Only the active scheduler exports them (a standby yields nothing), so a sum over every
scheduler counts each job once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from jobs import budgets, ledger
from jobs.stats import Money, read_money

log = logging.getLogger(__name__)

#: How often the SQL figures (budgets, today's spend) are read again, in seconds.
MONEY_EVERY_S = 10.0


@dataclass
class Snapshot:
    """What was last read."""

    spent: list[Money] = field(default_factory=list)
    saved: list[Money] = field(default_factory=list)
    budgets: list[budgets.Budget] = field(default_factory=list)
    #: tenant -> (spent, saved) today (UTC).
    today: dict[str, tuple[float, float]] = field(default_factory=dict)


class MoneyView(Collector):
    """The money counters and budget gauges; ``refresh`` from the scheduler loop,
    ``collect`` from the HTTP thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._sql_at = 0.0

    def standby(self) -> None:
        """Export nothing (this scheduler is not the active one)."""
        with self._lock:
            self._snap = None
        self._sql_at = 0.0

    def refresh(self, r: redis.Redis, engine: Engine, now: float) -> Snapshot:
        """Read the counters (every call) and the SQL figures (every ``MONEY_EVERY_S``;
        the last ones kept while SQL fails)."""
        spent, saved = read_money(r)
        with self._lock:
            old = self._snap or Snapshot()
        snap = Snapshot(spent, saved, old.budgets, old.today)
        if time.monotonic() - self._sql_at >= MONEY_EVERY_S:
            try:
                snap.budgets = budgets.get_budgets(engine, now=now)
                snap.today = ledger.spent_today(engine, now)
                self._sql_at = time.monotonic()
            except SQLAlchemyError as exc:
                log.warning("could not read budgets and today's spend: %s", exc)
        with self._lock:
            self._snap = snap
        return snap

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snap = self._snap
        if snap is None:
            return
        spend = CounterMetricFamily(
            "promptbatch_spend_usd", "US dollars spent, by the deployments' prices (counted "
            "once per job, in the step that stores its result).",
            labels=["tenant", "provider", "model"])
        sums: dict[tuple[str, ...], float] = defaultdict(float)
        for m in snap.spent:
            sums[(m.tenant, m.provider, m.model)] += m.usd
        for labels, usd in sorted(sums.items()):
            spend.add_metric(list(labels), usd)
        yield spend
        saved = CounterMetricFamily(
            "promptbatch_saved_usd", "US dollars not spent, by reason: exact_cache, "
            "coalesced, semantic_cache, prefix_cache, batch_discount.",
            labels=["tenant", "reason"])
        for m in sorted(snap.saved, key=lambda m: (m.tenant, m.reason)):
            saved.add_metric([m.tenant, m.reason], m.usd)
        yield saved
        yield from _gauges(snap.budgets)

    def today(self) -> dict[str, Any] | None:
        """Today's spend for the overview: the total and the tenants, dearest first."""
        with self._lock:
            snap = self._snap
        if snap is None:
            return None
        rows = sorted(snap.today.items(), key=lambda kv: -kv[1][0])
        return {"day": ledger.day_of(time.time()),
                "spent_usd": round(sum(v[0] for _, v in rows), 6),
                "saved_usd": round(sum(v[1] for _, v in rows), 6),
                "tenants": [{"tenant": t, "spent_usd": round(v[0], 6),
                             "saved_usd": round(v[1], 6)} for t, v in rows]}


def _gauges(found: list[budgets.Budget]) -> Iterator[Metric]:
    labels = ["scope", "name", "period"]
    spent = GaugeMetricFamily("promptbatch_budget_spent_usd", "US dollars a budget has "
                              "spent in its current period.", labels=labels)
    limit = GaugeMetricFamily("promptbatch_budget_limit_usd", "A budget's limit in US "
                              "dollars per period.", labels=labels)
    for b in found:
        spent.add_metric([b.scope, b.name, b.period], b.spent_usd)
        limit.add_metric([b.scope, b.name, b.period], b.limit_usd)
    yield spent
    yield limit

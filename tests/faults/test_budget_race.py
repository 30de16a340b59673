"""A budget holds under concurrency: 20 submitters on two API processes (real uvicorn
processes) against a small budget, a scheduler and a worker running the jobs on the
simulated provider, the store a real SQLite file or PostgreSQL. After every job ended,
the real spend summed from the SQL rows passes the budget by at most one job's estimate,
and every accepted job ended."""

from __future__ import annotations

import json
import threading
from collections import Counter

import httpx
import pytest
from sqlalchemy import func, select

from config.settings import Settings
from jobs import budgets
from jobs.costs import estimate_cost
from jobs.ids import new_id
from jobs.models import JobSpec
from jobs.prices import PriceBook
from jobs.store import JobStore
from jobs.tables import SPEND
from promptbatch.embedded import free_port
from tests.conftest import BOTH_STORES, Procs
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow, BOTH_STORES]

SUBMITTERS = 20
TRIES = 8
KEY = "race-key-of-tenant-race"


def _prompt(who: int, n: int) -> str:
    return f"submitter {who:02d} job {n:02d}: " + "classify this support ticket " * 8


def test_spend_never_passes_a_budget_by_more_than_one_estimate(settings: Settings,
                                                                procs: Procs) -> None:
    store = JobStore(settings.database_url)
    spec = JobSpec.model_validate({"id": new_id(), "prompt": _prompt(0, 0), "tenant": "race",
                                   "provider": "simulated", "model": "sim-1", "priority": 2,
                                   "created_at": 0.0, "params": {"max_tokens": 64}})
    est = estimate_cost(spec, PriceBook.for_settings(settings).price("simulated", "sim-1"),
                        settings.budget_output_tokens)
    assert est is not None and est > 0
    limit = 25 * est
    budgets.set_budget(store.engine, "tenant", "race", limit, "day")
    env = {"PROMPTBATCH_API_KEYS": json.dumps({KEY: "race"}),
           "PROMPTBATCH_SIMULATED_TIME_SCALE": "0", "PROMPTBATCH_CACHE_ENABLED": "false"}
    procs.scheduler(**env)
    procs.worker(concurrency=2, **env)
    ports = [free_port(), free_port()]
    for port in ports:
        procs.spawn("api", "--port", str(port), **env)
    for port in ports:
        poll(lambda p=port: _ready(p), timeout=60, what=f"the API on port {port}")

    statuses: Counter[int] = Counter()
    accepted: list[str] = []
    lock = threading.Lock()

    def submitter(who: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
            for n in range(TRIES):
                port = ports[(who + n) % 2]
                resp = http.post(f"http://127.0.0.1:{port}/v1/jobs", json={
                    "prompt": _prompt(who, n), "provider": "simulated",
                    "params": {"max_tokens": 64}, "priority": "normal"})
                with lock:
                    statuses[resp.status_code] += 1
                    if resp.status_code == 201:
                        accepted.append(resp.json()["id"])
                    else:
                        assert resp.status_code == 402, resp.text
                        assert resp.json()["error"]["budget"]["name"] == "race"

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(SUBMITTERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses[402] > 0, f"the budget never bound: {statuses}"
    assert set(statuses) <= {201, 402}, statuses
    assert len(accepted) == statuses[201] >= 1

    def all_final() -> bool:
        found = store.get_many(accepted)
        return len(found) == len(accepted) and all(s.state.final for s in found.values())

    poll(all_final, timeout=120, interval=0.2, what="every accepted job to end")
    final = store.get_many(accepted)
    assert Counter(s.state.value for s in final.values()) == {"SUCCEEDED": len(accepted)}
    with store.engine.connect() as conn:
        spent, jobs = conn.execute(select(func.sum(SPEND.c.cost_usd), func.sum(SPEND.c.jobs))
                                   .where(SPEND.c.tenant == "race")).one()
    assert int(jobs) == len(accepted)  # each accepted job counted once, none lost
    assert float(spent) <= limit + est, (spent, limit, est)
    [budget] = budgets.get_budgets(store.engine, "tenant", ["race"])
    assert budget.spent_usd == pytest.approx(float(spent))
    assert budget.reserved_usd == pytest.approx(0.0, abs=1e-12)  # every reservation settled
    store.close()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

"""Money through the one result path: a real Redis-compatible server, SQLite (and
PostgreSQL), the simulated provider run by a worker's batch runner in this process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select

from config import keys
from config.settings import Settings
from jobs import budgets, ledger
from jobs.costs import estimate_cost
from jobs.errors import BudgetExceeded
from jobs.models import JobState
from jobs.outcomes import record_results
from jobs.retention import purge_older_than
from jobs.stats import read_money
from jobs.tables import SAVINGS, SPEND, JobRow
from producers.client import Client
from scheduler.metrics import SchedulerMetrics
from tests.conftest import BOTH_STORES, settings_env
from workers.batch import BatchRunner
from workers.providers import create_provider

pytestmark = [pytest.mark.integration, BOTH_STORES]


@pytest.fixture
def sim(settings: Settings) -> Settings:
    return settings.model_copy(update={"default_provider": "simulated",
                                       "simulated_time_scale": 0.0})


def run_all(client: Client, settings: Settings, ids: list[str], batch: str = "b1") -> None:
    """Claim ``ids`` for one batch, as the scheduler does, and run it, as a worker does."""
    assert client.queue.acquire_lease("test-scheduler", 30)
    tenants = {i: stored.spec.tenant for i, stored in client.store.get_many(ids).items()}
    assert client.queue.claim("test-scheduler", batch, "{}", [(i, tenants[i]) for i in ids],
                              time.time(), 2) == ids
    BatchRunner(settings, client.queue, client.store,
                lambda name: create_provider(name, settings)).run(batch, "send-1", ids)


def sql_spend(client: Client) -> tuple[float, int]:
    with client.store.engine.connect() as conn:
        cost, jobs = conn.execute(select(func.sum(SPEND.c.cost_usd),
                                         func.sum(SPEND.c.jobs))).one()
    return float(cost or 0.0), int(jobs or 0)


def counted(client: Client) -> tuple[float, dict[str, float]]:
    spent, saved = read_money(client.r)
    return sum(m.usd for m in spent), {m.reason: m.usd for m in saved}


def test_a_result_is_priced_and_its_spend_counted_once_whoever_writes_it_again(
        sim: Settings) -> None:
    with Client(sim) as client:
        ids = client.submit_many({"prompt": f"Summarise report {i}: " + "lorem ipsum " * 20,
                                  "params": {"max_tokens": 40}, "cache": "off"}
                                 for i in range(6))
        run_all(client, sim, ids)
        results = [client.result(i, timeout=10) for i in ids]
        costs = [r.usage.cost_usd for r in results if r.usage]
        assert len(costs) == 6 and all(c is not None and c > 0 for c in costs)
        total = sum(c for c in costs if c is not None)
        assert sql_spend(client)[0] == pytest.approx(total)
        assert sql_spend(client)[1] == 6
        assert counted(client)[0] == pytest.approx(total)
        # The same results again (a late worker, the reconciler): nothing is counted twice.
        won = record_results(client.store, client.queue, results, ["default"] * 6,
                             result_ttl_s=60, prices=client.submitter.prices)
        assert won == set()
        assert sql_spend(client)[0] == pytest.approx(total)
        assert sql_spend(client)[1] == 6
        assert counted(client)[0] == pytest.approx(total)
        stored = client.store.get(ids[0])
        assert stored is not None and stored.result is not None
        assert stored.result.usage is not None
        assert stored.result.usage.cost_usd == pytest.approx(costs[0])


def test_an_exact_cache_hit_costs_nothing_and_saves_what_its_own_call_would_have(
        sim: Settings) -> None:
    with Client(sim) as client:
        job: dict[str, Any] = {"prompt": "What is the capital of France? " * 10,
                               "params": {"temperature": 0, "max_tokens": 20}}
        first = client.submit(**job)
        run_all(client, sim, [first])
        source = client.result(first, timeout=10)
        assert source.usage is not None and source.usage.cost_usd
        [(again, state)] = client.submit_many_states([job])
        assert state is JobState.SUCCEEDED
        hit = client.result(again, timeout=10)
        assert hit.cache == "exact" and hit.usage is not None
        assert hit.usage.cost_usd == 0.0
        # Its own call: the source's tokens at the fast lane's price (the source's cost).
        assert hit.usage.saved_usd == pytest.approx(source.usage.cost_usd)
        with client.store.engine.connect() as conn:
            rows = conn.execute(select(SAVINGS.c.reason, SAVINGS.c.jobs, SAVINGS.c.saved_usd)
                                .where(SAVINGS.c.reason == "exact_cache")).all()
        assert [(r[0], r[1]) for r in rows] == [("exact_cache", 1)]
        assert rows[0][2] == pytest.approx(source.usage.cost_usd)
        assert counted(client)[1]["exact_cache"] == pytest.approx(source.usage.cost_usd)
        assert sql_spend(client)[0] == pytest.approx(source.usage.cost_usd)
        assert sql_spend(client)[1] == 2


def test_a_budget_refuses_a_submit_that_would_pass_it_and_settles_the_real_cost(
        sim: Settings) -> None:
    with Client(sim) as client:
        job = {"prompt": "Classify this ticket: " + "words " * 30,
               "params": {"max_tokens": 50}, "cache": "off"}
        one = estimate_cost(_spec(client, job), client.submitter.prices.price(
            "simulated", "sim-1"), sim.budget_output_tokens)
        assert one is not None and one > 0
        budgets.set_budget(client.store.engine, "tenant", "default", 3.5 * one, "day")
        ids = client.submit_many([job, job, job])
        rows_before = _jobs(client)
        with pytest.raises(BudgetExceeded) as refused:
            client.submit_many([job])
        assert _jobs(client) == rows_before  # nothing of the refused call was written
        message = str(refused.value)
        assert "tenant 'default'" in message and "a day" in message
        assert "resets at" in message and "UTC" in message
        assert refused.value.reserved_usd == pytest.approx(3 * one)
        [b] = budgets.get_budgets(client.store.engine)
        assert b.reserved_usd == pytest.approx(3 * one) and b.spent_usd == 0.0
        run_all(client, sim, ids[:2])
        assert client.cancel(ids[2]) is JobState.CANCELLED
        spent = sum(r.usage.cost_usd or 0.0 for r in (client.result(i, timeout=10)
                                                       for i in ids[:2]) if r.usage)
        [b] = budgets.get_budgets(client.store.engine)
        assert b.reserved_usd == pytest.approx(0.0, abs=1e-12)
        assert b.spent_usd == pytest.approx(spent) and spent < 2 * one
        client.submit_many([job])  # the released room takes a job again


def _spec(client: Client, job: dict[str, Any]) -> Any:
    from jobs.ids import new_id
    from jobs.validation import parse_request, resolve

    return resolve(parse_request(job, line=1), job_id=new_id(), now=time.time(),
                   settings=client.settings, tenant=None, line=1)


def _jobs(client: Client) -> int:
    with client.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(JobRow)).scalar_one())


def test_retention_keeps_the_daily_spend_after_the_jobs_are_purged(sim: Settings) -> None:
    with Client(sim) as client:
        ids = client.submit_many({"prompt": f"job {i} " * 30, "cache": "off"}
                                 for i in range(3))
        run_all(client, sim, ids)
        before = ledger.totals(client.store.engine, by="deployment")
        done = purge_older_than(client.store, 0, now=time.time() + 60)
        assert done.jobs == 3 and _jobs(client) == 0
        after = ledger.totals(client.store.engine, by="deployment")
        assert after == before and after[0].group == "simulated|sim-1" and after[0].jobs == 3


def test_the_active_schedulers_metrics_carry_spend_savings_and_budgets(sim: Settings) -> None:
    with Client(sim) as client:
        ids = client.submit_many({"prompt": "Shared preamble of the template. " * 40
                                  + f"question {i}", "cache": "off", "tenant": "acme"}
                                 for i in range(4))
        budgets.set_budget(client.store.engine, "tenant", "acme", 5.0, "month")
        run_all(client, sim, ids)
        metrics = SchedulerMetrics()
        snap = metrics.money.refresh(client.r, client.store.engine, time.time())
        text = generate_latest(metrics.registry).decode()
        spent = sql_spend(client)[0]
        line = next(x for x in text.splitlines() if x.startswith(
            'promptbatch_spend_usd_total{model="sim-1",provider="simulated",tenant="acme"}'))
        assert float(line.split()[-1]) == pytest.approx(spent)
        assert 'promptbatch_saved_usd_total{reason="prefix_cache",tenant="acme"}' in text
        assert ('promptbatch_budget_limit_usd{name="acme",period="month",scope="tenant"} 5.0'
                in text)
        gauge = next(x for x in text.splitlines() if x.startswith(
            'promptbatch_budget_spent_usd{name="acme",period="month",scope="tenant"}'))
        assert float(gauge.split()[-1]) == pytest.approx(spent)
        assert snap.today["acme"][0] == pytest.approx(spent)
        assert metrics.money.today() is not None
        metrics.money.standby()
        assert "promptbatch_spend_usd_total" not in generate_latest(metrics.registry).decode()
        assert client.r.hget(keys.STATS, "$|acme|simulated|sim-1") is not None


def test_a_coalesced_follower_costs_nothing_and_saves_the_leaders_call(sim: Settings) -> None:
    with Client(sim) as client:
        job: dict[str, Any] = {"prompt": "Identical request " * 20,
                               "params": {"temperature": 0}}
        leader = client.submit(**job)
        follower = client.submit(**job)  # follows the leader (pending, identical)
        run_all(client, sim, [leader])
        res = client.result(follower, timeout=10)
        lead = client.result(leader, timeout=10)
        assert res.cache == "coalesced" and res.usage is not None and lead.usage is not None
        assert res.usage.cost_usd == 0.0
        assert res.usage.saved_usd == pytest.approx(lead.usage.cost_usd)
        assert counted(client)[1]["coalesced"] == pytest.approx(lead.usage.cost_usd)


def _cli(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "promptbatch", *argv],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.slow
def test_the_money_commands_set_budgets_and_show_spend(sim: Settings) -> None:
    with Client(sim) as client:
        ids = client.submit_many({"prompt": f"job {i} " * 30, "cache": "off", "tenant": "acme"}
                                 for i in range(2))
        run_all(client, sim, ids)
        spent = sql_spend(client)[0]
    done = _cli(sim, "tenants", "budget", "acme", "500", "--period", "month")
    assert done.returncode == 0, done.stderr
    assert "tenant acme: budget $500.00 a month (UTC)" in done.stdout
    added = _cli(sim, "keys", "add", "acme", "--budget", "20", "--budget-period", "day")
    assert added.returncode == 0, added.stderr
    prefix = added.stdout.strip()[:11]
    assert f"key {prefix}: budget $20.00 a day (UTC)" in added.stderr
    shown = _cli(sim, "spend", "--by", "deployment", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert [(r["group"], r["jobs"]) for r in data["data"]] == [("simulated|sim-1", 2)]
    assert data["data"][0]["cost_usd"] == pytest.approx(spent, abs=1e-6)
    assert {(b["scope"], b["name"]) for b in data["budgets"]} == {("tenant", "acme"),
                                                                 ("key", prefix)}
    [tenant] = [b for b in data["budgets"] if b["scope"] == "tenant"]
    assert tenant["spent_usd"] == pytest.approx(spent, abs=1e-6)  # what was spent already
    table = _cli(sim, "spend", "--tenant", "acme")
    assert table.returncode == 0 and ledger.day_of(time.time()) in table.stdout
    assert _cli(sim, "keys", "budget", "pb-NoSuchKey", "5").returncode == 2
    wrong = _cli(sim, "spend", "--since", "last week")
    assert wrong.returncode == 2 and "YYYY-MM-DD" in wrong.stderr
    removed = _cli(sim, "tenants", "budget", "acme", "--remove")
    assert removed.returncode == 0 and "budget removed" in removed.stdout


def test_a_submit_undone_releases_what_it_reserved(sim: Settings) -> None:
    with Client(sim) as client:
        budgets.set_budget(client.store.engine, "tenant", "default", 1.0, "none")
        spec = _spec(client, {"prompt": "undo me " * 20, "cache": "off"})
        client.store.insert([spec], holds={spec.id: 0.25}, api_key="pb-NoBudgetKy")
        [b] = budgets.get_budgets(client.store.engine)
        assert b.reserved_usd == pytest.approx(0.25)
        client.store.delete([spec.id])  # what a submit whose Redis step failed does
        [b] = budgets.get_budgets(client.store.engine)
        assert b.reserved_usd == pytest.approx(0.0, abs=1e-12) and b.spent_usd == 0.0


class _Died(BaseException):
    """A worker process killed between its SQL write and its Redis write."""


def _stored_in_sql_only(client: Client, settings: Settings, ids: list[str]) -> None:
    """Run ``ids`` as one batch whose worker dies after the SQL step of its results (their
    spend and savings rows written) and before the Redis step (the counters)."""
    queue = client.queue

    class Dying(type(queue)):  # type: ignore[misc]
        def finish(self, *args: Any, **kwargs: Any) -> Any:
            raise _Died

    dying = Dying(queue.r)
    assert queue.acquire_lease("test-scheduler", 30)
    tenants = {i: s.spec.tenant for i, s in client.store.get_many(ids).items()}
    assert queue.claim("test-scheduler", "b1", "{}", [(i, tenants[i]) for i in ids],
                       time.time(), 2) == ids
    queue.release_lease("test-scheduler")
    with pytest.raises(_Died):
        BatchRunner(settings, dying, client.store,
                    lambda name: create_provider(name, settings)).run("b1", "send-1", ids)
    assert all(s.state.final for s in client.store.get_many(ids).values())
    assert counted(client) == (0.0, {})


@pytest.mark.parametrize("copier", ["reconciler", "worker"])
def test_results_copied_from_sql_to_redis_count_their_savings_by_reason(
        sim: Settings, copier: str) -> None:
    from scheduler.reconcile import reconcile

    with Client(sim) as client:
        system = "You are the records clerk of desk 7. " * 40  # a prefix read from the cache
        ids = client.submit_many({"messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": f"record {i}"}],
                                  "params": {"max_tokens": 20}, "cache": "off"}
                                 for i in range(6))
        _stored_in_sql_only(client, sim, ids)
        if copier == "reconciler":  # its pass writes back what the result backend lacks
            reconcile(client.store, client.queue, sim.model_copy(
                update={"reconcile_grace_s": 0.0}), time.time())
        else:  # the batch's next worker finds the results stored and copies them
            runner = BatchRunner(sim, client.queue, client.store,
                                 lambda name: create_provider(name, sim))
            runner._copy_stored(ids, {i: client.spec(i) for i in ids})
        assert {client.result(i, timeout=10).state for i in ids} == {JobState.SUCCEEDED}
        (total,) = ledger.totals(client.store.engine, by="deployment")
        assert total.saved_usd["prefix_cache"] > 0
        spent, saved = counted(client)
        assert spent == pytest.approx(total.cost_usd)
        assert saved == pytest.approx(total.saved_usd), "the counters lost the savings"

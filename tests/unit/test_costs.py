"""What a job cost and saved, from the provider's token counts; what a job may cost at
most, for budgets; the periods of budgets."""

from __future__ import annotations

import calendar
import time

import pytest

from config.settings import PriceEntry
from jobs import budgets
from jobs.costs import call_charge, charge, estimate_cost, hit_usage, priced
from jobs.ids import new_id
from jobs.models import JobResult, JobSpec, JobState, Usage
from jobs.prices import Price, PriceBook, Rates

#: A made-up price: $2 input, $0.5 cached, $2.5 cache write, $8 output per million.
PRICE = Price(Rates(2.0, 0.5, 2.5, 8.0), 0.5, "test")


def test_a_call_costs_each_kind_of_token_at_its_price() -> None:
    u = Usage(prompt_tokens=1_000_000, cached_tokens=400_000, cache_write_tokens=100_000,
              completion_tokens=10_000)
    got = call_charge(u, PRICE)
    assert got.cost == pytest.approx(500_000 * 2e-6 + 400_000 * 0.5e-6 + 100_000 * 2.5e-6
                                     + 10_000 * 8e-6)
    assert got.saved == pytest.approx({"prefix_cache": 400_000 * 1.5e-6})


def test_the_batch_lane_pays_the_discount_and_saves_the_rest() -> None:
    u = Usage(prompt_tokens=2000, cached_tokens=1000, completion_tokens=100)
    fast, batch = call_charge(u, PRICE), call_charge(u, PRICE, batch=True)
    assert fast.cost is not None and batch.cost == pytest.approx(fast.cost * 0.5)
    assert batch.saved["batch_discount"] == pytest.approx(fast.cost * 0.5)
    assert batch.saved["prefix_cache"] == pytest.approx(fast.saved["prefix_cache"] * 0.5)


def _result(**kw: object) -> JobResult:
    base: dict[str, object] = {"id": new_id(), "state": JobState.SUCCEEDED,
                               "provider": "p", "model": "m"}
    return JobResult.model_validate({**base, **kw})


def test_a_result_is_priced_by_its_deployment_and_lane() -> None:
    book = PriceBook({"p|m": PriceEntry(
        input=2.0, cached_input=0.5, cache_write=2.5, output=8.0, batch_discount=0.5)})
    u = Usage(prompt_tokens=1000, cached_tokens=500, completion_tokens=10)
    res, got = priced(_result(usage=u), book)
    assert res.usage is not None and res.usage.cost_usd == pytest.approx(got.cost)
    assert res.usage.saved_usd == pytest.approx(500 * 1.5e-6)
    lane, _ = priced(_result(usage=u, lane="provider_batch"), book)
    assert lane.usage is not None and res.usage.cost_usd is not None
    assert lane.usage.cost_usd == pytest.approx(res.usage.cost_usd / 2)
    again, _ = priced(res, book)
    assert again is res  # priced once: the same object, its JSON still good


def test_a_deployment_without_a_price_costs_null_never_a_guess() -> None:
    book = PriceBook({}, base_urls={})
    res, got = priced(_result(usage=Usage(prompt_tokens=10)), book)
    assert got.cost is None and res.usage is not None and res.usage.cost_usd is None
    assert res.usage.saved_usd is None


@pytest.mark.parametrize(("kind", "reason"), [("exact", "exact_cache"),
                                              ("semantic", "semantic_cache"),
                                              ("coalesced", "coalesced")])
def test_an_answer_without_a_call_costs_0_and_saves_its_own_calls_cost(
        kind: str, reason: str) -> None:
    source = Usage(prompt_tokens=3000, cached_tokens=1000, completion_tokens=50)
    usage = hit_usage(source, PRICE)
    assert usage is not None and usage.cost_usd == 0.0
    assert usage.saved_usd == pytest.approx(call_charge(source, PRICE).cost)
    got = charge(_result(usage=usage, cache=kind), PriceBook())
    assert got.cost == 0.0 and got.saved == {reason: usage.saved_usd}


def _spec(**kw: object) -> JobSpec:
    return JobSpec.model_validate({"id": new_id(), "prompt": "x" * 400, "tenant": "t",
                                   "provider": "simulated", "model": "sim-1",
                                   "created_at": 0.0, "priority": 4, **kw})


def test_the_estimate_is_an_upper_bound_of_what_simulated_charges() -> None:
    from workers.providers.base import ProviderRequest
    from workers.providers.simulated import answer_tokens, prompt_tokens

    spec = _spec(params={"max_tokens": 64})
    est = estimate_cost(spec, PRICE, 1024)
    req = ProviderRequest.from_spec(spec, 0)
    real = call_charge(Usage(prompt_tokens=prompt_tokens(req),
                             completion_tokens=answer_tokens(req, None)), PRICE).cost
    assert est is not None and real is not None and real <= est
    assert estimate_cost(_spec(), PRICE, 1024) == pytest.approx(
        (101 * 2.5 + 1024 * 8.0) / 1e6)  # no max_tokens: the default output
    assert estimate_cost(spec, None, 1024) is None


@pytest.mark.parametrize(("period", "at", "key", "reset"), [
    ("day", "2026-12-31 23:59:59", "2026-12-31", "2027-01-01 00:00:00"),
    ("month", "2026-12-31 23:59:59", "2026-12", "2027-01-01 00:00:00"),
    ("month", "2026-02-10 08:00:00", "2026-02", "2026-03-01 00:00:00"),
    ("none", "2026-02-10 08:00:00", "none", None),
])
def test_a_budgets_period_and_when_it_resets(period: str, at: str, key: str,
                                             reset: str | None) -> None:
    def ts(text: str) -> float:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S")))

    assert budgets.period_key(period, ts(at)) == key
    assert budgets.resets_at(period, ts(at)) == (None if reset is None else ts(reset))

"""The half-price lane's pure rules: which jobs go to a provider batch, what a submit
refuses, when a provider batch leaves the scheduler, and when an open one is looked at
again."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from config.settings import Settings
from jobs.lanes import choose, endpoint, refusal
from jobs.models import JobSpec, Priority
from jobs.provider_batches import ProviderBatch
from scheduler.lane_desk import next_due
from scheduler.lanes import LaneJob, LanePending, plan_lane

NOW = 1_800_000_000.0
DAY = 24 * 3600.0


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"batch_api": {"openai|gpt-4o-mini": True, "anthropic": True},
                            "batch_api_margin_s": 3600.0, "batch_api_wait_s": 60.0}
    base.update(kw)
    return Settings(_env_file=None, **base)  # type: ignore[call-arg]


def spec(**kw: Any) -> JobSpec:
    base: dict[str, Any] = {"id": "j", "tenant": "t", "priority": Priority.BULK,
                            "created_at": NOW, "provider": "openai", "model": "gpt-4o-mini",
                            "prompt": "hello"}
    base.update(kw)
    return JobSpec(**base)


ENOUGH = DAY + 3600 + 60  # the window, the margin and the wait


@pytest.mark.parametrize(("fields", "overrides", "lane"), [
    ({}, {}, "provider_batch"),  # bulk, no deadline
    ({"deadline": NOW + ENOUGH}, {}, "provider_batch"),
    ({"deadline": NOW + ENOUGH - 1}, {}, "fast"),  # leaves too little
    ({"priority": Priority.LOW}, {}, "fast"),
    ({"priority": Priority.CRITICAL, "lane": "provider_batch"}, {}, "provider_batch"),
    ({"lane": "provider_batch", "deadline": NOW + 60}, {}, "provider_batch"),  # asked for
    ({"lane": "fast"}, {}, "fast"),
    ({"stream": True}, {}, "fast"),
    ({"model": "gpt-4o"}, {}, "fast"),  # a deployment without the endpoint
    ({"provider": "anthropic", "model": "claude-haiku-4-5"}, {}, "provider_batch"),
    ({"provider": "simulated", "model": "sim-1"}, {}, "fast"),
    ({}, {"batch_api_enabled": False}, "fast"),  # the off switch
    ({"lane": "provider_batch"}, {"batch_api_enabled": False}, "fast"),  # accepted before
    ({}, {"batch_api": {"openai": True, "openai|gpt-4o-mini": False}}, "fast"),
    ({"deadline": NOW + DAY + 3600 + 1}, {"batch_api_wait_s": 0.0}, "provider_batch"),
    ({"deadline": NOW + DAY + 1}, {"batch_api_wait_s": 0.0, "batch_api_margin_s": 0.0},
     "provider_batch"),
])
def test_which_jobs_go_to_a_provider_batch(fields: dict[str, Any], overrides: dict[str, Any],
                                           lane: str) -> None:
    assert choose(spec(**fields), settings(**overrides), NOW) == lane


def test_the_wait_defaults_to_the_bulk_class_longest_wait() -> None:
    s = settings(batch_api_wait_s=None, max_wait_ms=(0, 0, 0, 0, 30_000))
    assert choose(spec(deadline=NOW + DAY + 3600 + 30), s, NOW) == "provider_batch"
    assert choose(spec(deadline=NOW + DAY + 3600 + 29), s, NOW) == "fast"


@pytest.mark.parametrize(("provider", "model", "lane", "stream", "overrides", "says"), [
    ("openai", "gpt-4o-mini", "provider_batch", False, {}, None),
    ("openai", "gpt-4o-mini", "auto", False, {"batch_api": {}}, None),
    ("openai", "gpt-4o", "provider_batch", False, {},
     "PROMPTBATCH_BATCH_API='{\"openai|gpt-4o\": true}'"),
    ("simulated", "sim-1", "provider_batch", False, {}, "provider 'simulated' has no batch"),
    ("openai", "gpt-4o-mini", "provider_batch", True, {}, "does not stream"),
    ("openai", "gpt-4o-mini", "provider_batch", False, {"batch_api_enabled": False},
     "turned off"),
])
def test_a_submit_asking_for_a_provider_batch_it_cannot_have_is_refused_naming_lane(
        provider: str, model: str, lane: str, stream: bool, overrides: dict[str, Any],
        says: str | None) -> None:
    found = refusal(provider, model, lane, stream, settings(**overrides))
    if says is None:
        assert found is None
    else:
        assert found is not None and found[0] == "lane" and says in found[1]


def test_settings_name_a_provider_without_a_batch_endpoint_and_a_backoff_upside_down() -> None:
    with pytest.raises(ValidationError, match="batch_api: 'simulated' names a provider"):
        settings(batch_api={"simulated": True})
    with pytest.raises(ValidationError, match="batch_api_poll_max_s"):
        settings(batch_api_poll_min_s=10.0, batch_api_poll_max_s=5.0)


def test_the_providers_limits_and_a_lower_cap() -> None:
    found = endpoint(settings(), "openai", "gpt-4o-mini")
    assert found is not None and (found.max_requests, found.max_bytes) == (50_000, 200 * 2**20)
    found = endpoint(settings(batch_api_max_requests=10), "anthropic", "claude-x")
    assert found is not None and (found.max_requests, found.max_bytes) == (10, 256 * 2**20)


def job(i: int, family: int | None = 1, at: float = NOW, size: int = 1000,
        dep: str = "openai|gpt-4o-mini") -> LaneJob:
    return LaneJob(id=f"j{i}", tenant="t", deployment=dep, created_at=at, size=size,
                   family=family)


def pending(*jobs: LaneJob) -> LanePending:
    p = LanePending()
    p.add(jobs)
    return p


def shape(batches: list[Any]) -> list[tuple[str, list[str]]]:
    return [(b.reason, [j.id for j in b.jobs]) for b in batches]


@pytest.mark.parametrize(("jobs", "now", "overrides", "full", "expected"), [
    # Young and below the limits: they wait for more.
    ([job(1), job(2)], NOW + 59, {}, False, []),
    # The oldest waited long enough: everything of the deployment leaves.
    ([job(1), job(2, at=NOW + 50)], NOW + 60, {}, False, [("wait", ["j1", "j2"])]),
    # The pool is full: waiting gathers nothing.
    ([job(1)], NOW, {}, True, [("room", ["j1"])]),
    # At the request limit a batch leaves at once; the rest waits.
    ([job(i) for i in range(5)], NOW, {"batch_api_max_requests": 2}, False,
     [("full", ["j0", "j1"]), ("full", ["j2", "j3"])]),
    # Families go whole: family 2 does not fit beside family 1, so it starts a batch.
    ([job(1, 1), job(2, 2), job(3, 2), job(4, 1)], NOW + 60, {"batch_api_max_requests": 3},
     False, [("full", ["j1", "j4"]), ("wait", ["j2", "j3"])]),
    # A job without a family is a family of its own.
    ([job(1, None), job(2, None)], NOW + 60, {"batch_api_max_requests": 1}, False,
     [("full", ["j1"]), ("wait", ["j2"])]),
    # The byte limit (a tenth kept spare): three 80 MB requests of 200 MB make two batches.
    ([job(i, size=80 * 2**20) for i in range(3)], NOW + 60, {}, False,
     [("full", ["j0", "j1"]), ("wait", ["j2"])]),
    # Deployments are batched apart.
    ([job(1), job(2, dep="anthropic|claude-x")], NOW + 60, {}, False,
     [("wait", ["j1"]), ("wait", ["j2"])]),
])
def test_when_a_provider_batch_leaves(jobs: list[LaneJob], now: float,
                                      overrides: dict[str, Any], full: bool,
                                      expected: list[tuple[str, list[str]]]) -> None:
    assert shape(plan_lane(pending(*jobs), now, settings(**overrides), full)) == expected


def test_lane_jobs_leave_the_pending_set_and_the_oldest_is_known() -> None:
    p = pending(job(1, at=NOW + 5), job(2, at=NOW, dep="anthropic|claude-x"))
    assert len(p) == 2 and "j1" in p and p.oldest() == NOW
    p.remove(["j2", "nope"])
    assert len(p) == 1 and p.oldest() == NOW + 5 and list(p.by_deployment) == [
        "openai|gpt-4o-mini"]


def record(state: str, polls: int = 0) -> ProviderBatch:
    return ProviderBatch(id="b", deployment="openai|m", state=state, jobs=1, created_at=NOW,
                         next_at=NOW, polls=polls)


@pytest.mark.parametrize(("state", "polls", "wait"), [
    ("submitted", 0, 10.0), ("submitted", 1, 20.0), ("submitted", 3, 80.0),
    ("submitted", 5, 300.0), ("submitted", 60, 300.0),  # capped, however many
    ("creating", 0, 600.0), ("ended", 2, 300.0),
])
def test_polls_back_off_from_seconds_to_minutes(state: str, polls: int, wait: float) -> None:
    s = settings(batch_api_poll_min_s=10.0, batch_api_poll_max_s=300.0,
                 batch_api_submit_retry_s=600.0)
    assert next_due(record(state, polls), NOW, s) == NOW + wait

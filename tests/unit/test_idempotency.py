"""Which job holds each idempotency key of an insert (pure: no store)."""

from __future__ import annotations

import pytest

from jobs.errors import IdempotencyConflict
from jobs.idempotency import first_of_each_key, holders
from jobs.models import JobSpec, Priority


def job(job_id: str, key: str | None, digest: str | None, tenant: str = "t") -> JobSpec:
    return JobSpec(id=job_id, tenant=tenant, priority=Priority.NORMAL, created_at=1.0,
                   provider="echo", model="echo-1", prompt="x", idempotency_key=key,
                   request_hash=digest)


@pytest.mark.parametrize(("specs", "stored", "expected"), [
    # no keys: each job holds itself
    ([job("a", None, None), job("b", None, None)], {}, {"a": "a", "b": "b"}),
    # a key used twice with one request: the first job holds it
    ([job("a", "k", "h1"), job("b", "k", "h1")], {}, {"a": "a", "b": "a"}),
    # the same key in two tenants: two jobs
    ([job("a", "k", "h1"), job("b", "k", "h2", tenant="u")], {}, {"a": "a", "b": "b"}),
    # a key stored already with the same request: the stored job holds it
    ([job("a", "k", "h1"), job("b", "k", "h1")], {("t", "k"): ("s", "h1")},
     {"a": "s", "b": "s"}),
    # a request of unknown digest (written before digests were kept) is not refused
    ([job("a", "k", None)], {("t", "k"): ("s", "h1")}, {"a": "s"}),
])
def test_each_job_maps_to_the_job_holding_its_key(
        specs: list[JobSpec], stored: dict[tuple[str, str], tuple[str, str | None]],
        expected: dict[str, str]) -> None:
    assert holders(specs, first_of_each_key(specs), stored) == expected


def test_a_key_used_again_with_another_request_is_refused_naming_both_lines() -> None:
    specs = [job("a", "k", "h1"), job("b", None, None), job("c", "k", "h2")]
    with pytest.raises(IdempotencyConflict) as err:
        first_of_each_key(specs)
    assert err.value.line == 3 and "line 1 of the same call" in str(err.value)


def test_a_key_stored_with_another_request_is_refused_naming_the_stored_job() -> None:
    specs = [job("a", None, None), job("b", "k", "h2")]
    with pytest.raises(IdempotencyConflict) as err:
        holders(specs, first_of_each_key(specs), {("t", "k"): ("stored-1", "h1")})
    assert err.value.line == 2 and err.value.job_id == "stored-1"

"""The half-price lane against Anthropic's Message Batches: a real HTTP server on loopback
written from the reference (``tests.fake_batches``), a real Redis-compatible server and a
SQLite store. The scheduler's desk (``LaneDesk``: claim, record) and the worker's runner
(``LaneRunner``: upload, poll, results) run in this process, step by step, so each test
sees every state a provider batch passes through."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from config import keys
from config.celery import build_celery
from config.settings import PriceEntry, Settings
from jobs.models import JobResult, JobSpec, JobState
from jobs.provider_batches import ProviderBatches
from jobs.queue import RedisQueue, connect
from jobs.store import JobStore
from producers.client import Client
from scheduler.lane_desk import LaneDesk
from scheduler.reconcile import reconcile
from tests.fake_batches import FakeBatches, FakeBatchesServer
from tests.helpers import poll
from workers.lane import LaneRunner, batch_client
from workers.providers.batch_api import BatchClient

pytestmark = pytest.mark.integration

TOKEN = "test-scheduler"
MODEL = "claude-haiku-4-5"
#: The deployment's price (US dollars per million tokens): the fake's URL is unknown to the
#: price library, so the settings give it one, with Anthropic's batch discount.
PRICE = PriceEntry(input=1.0, cached_input=0.1, cache_write=1.25, output=5.0,
                   batch_discount=0.5)
SYSTEM_A = "You are a careful translator of legal documents. " * 8  # a family, cached
SYSTEM_B = "You summarise support tickets in one line, politely. " * 8


@pytest.fixture
def fake() -> Iterator[FakeBatches]:
    with FakeBatchesServer() as state:
        yield state


@pytest.fixture
def lane_settings(settings: Settings, fake: FakeBatches) -> Settings:
    return settings.model_copy(update={
        "anthropic_base_url": fake.url, "anthropic_api_key": SecretStr("sk-ant-test"),
        "batch_api": {"anthropic": True}, "anthropic_min_cache_tokens": 50,
        "prices": {f"anthropic|{MODEL}": PRICE},
        "batch_api_wait_s": 0.0, "batch_api_submit_retry_s": 1.0,
        "batch_api_poll_min_s": 0.05, "batch_api_poll_max_s": 0.2})


class Lane:
    """The scheduler's desk and a worker's runner over one Redis and one store."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.client = Client(s)
        self.queue = RedisQueue(connect(s.redis_url))
        self.store = JobStore(s.database_url)
        assert self.queue.acquire_lease(TOKEN, 600)
        self.desk = LaneDesk(s, self.queue, self.store, build_celery(s, "test", s.redis_url),
                             TOKEN, lambda: None)
        self.clients: dict[str, BatchClient] = {}
        self.runner = LaneRunner(s, self.queue, self.store, self.batch_client)
        self.lanes = ProviderBatches(self.store)

    def batch_client(self, name: str) -> BatchClient:
        if name not in self.clients:
            self.clients[name] = batch_client(name, self.s)
        return self.clients[name]

    def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        defaults = {"provider": "anthropic", "model": MODEL, "priority": "bulk"}
        return self.client.submit_many([{**defaults, **j} for j in jobs])

    def send(self, ids: list[str]) -> str:
        """Admit the jobs as the scheduler does; send their provider batch; its id."""
        specs = [s for s, _ in self.queue.load(ids) if s is not None]
        fast = self.desk.admit(specs, time.time())
        assert fast == [], f"{[s.id for s in fast]} took the fast path"
        assert self.desk.tick(time.time(), full=True) == len(ids)
        (rec,) = self.lanes.open()
        return rec.id

    def results(self, ids: list[str]) -> dict[str, JobResult]:
        return {i: self.client.result(i, timeout=5) for i in ids}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.client.close()
        self.store.close()


@pytest.fixture
def lane(lane_settings: Settings) -> Iterator[Lane]:
    it = Lane(lane_settings)
    yield it
    it.close()


def family(system: str, question: str) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}


def test_a_provider_batch_answers_through_the_one_result_path_and_its_failed_lines_too(
        lane: Lane, fake: FakeBatches) -> None:
    ids = lane.submit([family(SYSTEM_A, "clause 1"), family(SYSTEM_A, "clause 2"),
                       family(SYSTEM_B, "ticket 7"), family(SYSTEM_B, "ticket 8"),
                       {"prompt": "bad one [errored:invalid_request_error]"},
                       {"prompt": "busy one [errored:overloaded_error]"},
                       {"prompt": "asked for the lane", "priority": "high",
                        "lane": "provider_batch"}])
    batch_id = lane.send(ids)
    assert lane.lanes.get(batch_id).state == "creating"  # type: ignore[union-attr]
    assert {s for s, _ in lane.queue.states_and_batches(ids)} == {"AT_PROVIDER"}
    assert lane.queue.lane_open().keys() == {batch_id}

    sent = lane.runner.submit(batch_id)
    assert sent["jobs"] == 7 and fake.created == 1
    (upstream,) = fake.batches.values()
    params = {r["custom_id"]: r["params"] for r in upstream.requests}
    assert set(params) == set(ids), "custom ids are the job ids"
    marked = [p for p in params.values() if isinstance(p.get("system"), list)]
    assert len(marked) == 4, "each family's shared system prompt is marked for the cache"
    assert all(p["system"][0]["cache_control"] == {"type": "ephemeral"} for p in marked)

    summary = lane.runner.poll(batch_id)
    assert summary["succeeded"] == 5 and summary["failed"] == 1 and summary["fast"] == 1
    done = lane.results([i for i in ids if i != ids[5]])
    for i in ids[:4] + ids[6:]:
        res = done[i]
        assert res.state is JobState.SUCCEEDED and res.lane == "provider_batch"
        assert res.batch_id == batch_id and res.usage is not None
        assert res.text == f"re: {params[i]['messages'][-1]['content'][:40]}"
    assert done[ids[0]].usage is not None and done[ids[0]].usage.cached_tokens == 100
    failed = done[ids[4]]
    assert failed.state is JobState.FAILED and failed.lane == "provider_batch"
    assert "invalid_request_error" in (failed.error or "")
    # The overloaded line runs again on the fast path: back in intake, lane "fast".
    (spec, state), = lane.queue.load([ids[5]])
    assert state == "QUEUED" and spec is not None and spec.lane == "fast"
    stored = lane.store.get(ids[5])
    assert stored is not None and stored.state is JobState.QUEUED
    assert stored.spec.lane == "fast"
    assert ids[5] in {e["id"] for _, e in lane.client.r.xrange(keys.INTAKE)}
    rec = lane.lanes.get(batch_id)
    assert rec is not None and rec.state == "closed" and rec.provider_status == "ended"
    assert lane.queue.lane_open() == {}
    assert fake.calls("POST", "/v1/messages/batches") == 1
    assert fake.calls("GET", f"/v1/messages/batches/{upstream.id}") == 2  # a poll, results


def test_a_lane_answer_costs_its_fast_price_times_the_batch_discount_once_in_the_ledger(
        lane: Lane) -> None:
    from sqlalchemy import select

    from jobs.stats import read_money
    from jobs.tables import SAVINGS, SPEND

    ids = lane.submit([family(SYSTEM_A, "clause 1"), family(SYSTEM_A, "clause 2"),
                       {"prompt": "a plain one"}])
    batch_id = lane.send(ids)
    lane.runner.submit(batch_id)
    assert lane.runner.poll(batch_id)["succeeded"] == 3
    done = lane.results(ids)
    assert PRICE.input and PRICE.cached_input and PRICE.cache_write and PRICE.output
    fast: dict[str, float] = {}
    for i, res in done.items():
        u = res.usage
        assert res.state is JobState.SUCCEEDED and res.lane == "provider_batch" and u
        # The provider's own counts (the fake's: 10 input, 4 output, 100 read from the
        # cache for a marked family's prefix) at the fast price, then the discount.
        uncached = u.prompt_tokens - u.cached_tokens - u.cache_write_tokens
        fast[i] = (uncached * PRICE.input + u.cached_tokens * PRICE.cached_input
                   + u.cache_write_tokens * PRICE.cache_write
                   + u.completion_tokens * PRICE.output) / 1e6
        assert u.cost_usd == pytest.approx(fast[i] * 0.5), "a lane answer costs half"
        assert u.saved_usd == pytest.approx(fast[i] * 0.5
                                            + u.cached_tokens * 0.9 / 1e6 * 0.5)
    assert [done[i].usage.cached_tokens for i in ids] == [100, 100, 0]  # type: ignore[union-attr]
    with lane.store.engine.connect() as conn:
        spend = conn.execute(select(SPEND.c.provider, SPEND.c.model, SPEND.c.jobs,
                                    SPEND.c.cost_usd)).all()
        saved = {r.reason: (r.jobs, r.saved_usd) for r in conn.execute(
            select(SAVINGS.c.reason, SAVINGS.c.jobs, SAVINGS.c.saved_usd))}
    ((provider, model, jobs, cost),) = spend
    assert (provider, model, jobs) == ("anthropic", MODEL, 3)
    assert cost == pytest.approx(sum(fast.values()) * 0.5)
    assert saved["batch_discount"][0] == 3
    assert saved["batch_discount"][1] == pytest.approx(sum(fast.values()) * 0.5)
    assert saved["prefix_cache"] == (2, pytest.approx(2 * 100 * 0.9 / 1e6 * 0.5))
    spent, by_reason = read_money(lane.client.r)  # what the scheduler exports
    assert sum(m.usd for m in spent) == pytest.approx(cost)
    assert {m.reason: m.usd for m in by_reason}["batch_discount"] == pytest.approx(
        saved["batch_discount"][1])


def test_an_answer_that_breaks_its_schema_goes_to_the_fast_path(lane: Lane) -> None:
    fmt = {"type": "json_object"}
    ids = lane.submit([{"prompt": 'good [say:{"a": 1}]', "response_format": fmt},
                       {"prompt": "bad [say:not json at all]", "response_format": fmt}])
    batch_id = lane.send(ids)
    lane.runner.submit(batch_id)
    lane.runner.poll(batch_id)
    good = lane.client.result(ids[0], timeout=5)
    assert good.state is JobState.SUCCEEDED and good.parsed == {"a": 1}
    assert good.schema_retries == 0
    (spec, state), = lane.queue.load([ids[1]])
    assert state == "QUEUED" and spec is not None and spec.lane == "fast"


def test_an_expired_provider_batch_sends_its_jobs_to_the_fast_path_or_expires_them(
        lane: Lane, fake: FakeBatches) -> None:
    fake.hold = True
    ids = lane.submit([{"prompt": "no deadline"},
                       {"prompt": "short deadline", "lane": "provider_batch",
                        "timeout_s": 1.0}])
    batch_id = lane.send(ids)
    lane.runner.submit(batch_id)
    assert lane.runner.poll(batch_id)["status"] == "in_progress"
    deadline = lane.client.spec(ids[1]).deadline
    assert deadline is not None
    poll(lambda: time.time() > deadline, timeout=5, what="the short deadline to pass")
    (upstream,) = fake.batches
    fake.expire(upstream)
    summary = lane.runner.poll(batch_id)
    assert summary["fast"] == 1 and summary["expired"] == 1
    (spec, state), = lane.queue.load([ids[0]])
    assert state == "QUEUED" and spec is not None and spec.lane == "fast"
    late = lane.client.result(ids[1], timeout=5)
    assert late.state is JobState.EXPIRED and "expired" in (late.error or "")
    assert lane.lanes.get(batch_id).state == "closed"  # type: ignore[union-attr]


def test_cancelling_every_job_of_a_provider_batch_cancels_it_at_the_provider(
        lane: Lane, fake: FakeBatches) -> None:
    fake.hold = True
    ids = lane.submit([{"prompt": f"to cancel {i}"} for i in range(3)])
    batch_id = lane.send(ids)
    lane.runner.submit(batch_id)
    lane.client.cancel(ids[0])
    events = [f.get("cancel") for _, f in lane.client.r.xrange(keys.EVENTS)]
    assert ids[0] in events, "the scheduler is told, to look at the provider batch at once"
    lane.runner.poll(batch_id)
    assert fake.calls("POST", "/v1/messages/batches/") == 0, "jobs are left: not cancelled"
    assert lane.client.cancel_many(ids[1:]) == dict.fromkeys(ids[1:], JobState.CANCELLED)
    lane.runner.poll(batch_id)
    (upstream,) = fake.batches
    assert fake.calls("POST", f"/v1/messages/batches/{upstream}/cancel") == 1
    assert lane.lanes.get(batch_id).state == "closed"  # type: ignore[union-attr]
    assert {lane.client.status(i) for i in ids} == {JobState.CANCELLED}


def test_an_upload_that_died_after_the_provider_created_it_is_found_not_created_again(
        lane: Lane, fake: FakeBatches) -> None:
    ids = lane.submit([{"prompt": f"once {i}"} for i in range(4)])
    batch_id = lane.send(ids)
    # A first attempt takes the record, creates the batch at the provider, and dies
    # before recording its id (and another client's batch of another size appears).
    assert lane.lanes.begin_attempt(batch_id, "attempt-1", time.time(), 600) is not None
    lane.lanes.sending(batch_id, "attempt-1", 4)
    specs = lane.lanes.waiting(batch_id)
    from workers.providers.base import ProviderRequest

    first = lane.batch_client("anthropic").create(
        batch_id, [ProviderRequest.from_spec(s) for s in specs])
    fake.create({"requests": [{"custom_id": "someone-else", "params": {
        "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}}]})
    assert lane.runner.submit(batch_id)["skipped"], "the attempt is still young"
    poll(lambda: "adopted" in (got := lane.runner.submit(batch_id)) and got, timeout=5,
         interval=0.2, what="the next attempt to take over")
    assert fake.created == 2 and lane.lanes.get(batch_id).provider_batch_id == first  # type: ignore[union-attr]
    lane.runner.poll(batch_id)
    assert {r.state for r in lane.results(ids).values()} == {JobState.SUCCEEDED}
    assert fake.created == 2, "no second copy of the batch"


def test_jobs_claimed_for_a_batch_the_store_never_recorded_are_put_back(
        lane: Lane) -> None:
    ids = lane.submit([{"prompt": f"orphan {i}"} for i in range(3)])
    specs: list[JobSpec] = [s for s, _ in lane.queue.load(ids) if s is not None]
    # The scheduler claims them and dies before the record.
    assert lane.queue.lane_claim(TOKEN, "never-recorded", [(s.id, s.tenant) for s in specs],
                                 time.time()) == ids
    assert {s for s, _ in lane.queue.states_and_batches(ids)} == {"AT_PROVIDER"}
    repairs = reconcile(lane.store, lane.queue, lane.s.model_copy(
        update={"reconcile_grace_s": 0.0}), time.time())
    assert repairs.requeued == 3
    assert {s for _, s in lane.queue.load(ids)} == {"QUEUED"}
    entries = [json.loads(json.dumps(e))["id"] for _, e in lane.client.r.xrange(keys.INTAKE)]
    assert sorted(entries) == sorted(ids)


def test_a_batch_the_provider_no_longer_has_sends_its_jobs_to_the_fast_path(
        lane: Lane, fake: FakeBatches) -> None:
    fake.hold = True
    ids = lane.submit([{"prompt": f"lost {i}"} for i in range(2)])
    batch_id = lane.send(ids)
    lane.runner.submit(batch_id)
    fake.batches.clear()  # deleted at the provider
    assert "lost" in lane.runner.poll(batch_id)
    assert {s.lane for s, _ in lane.queue.load(ids) if s is not None} == {"fast"}
    assert {st for _, st in lane.queue.load(ids)} == {"QUEUED"}
    assert lane.lanes.get(batch_id).state == "closed"  # type: ignore[union-attr]


def test_a_provider_batch_is_claimed_a_chunk_at_a_time_and_recorded_whole(
        lane: Lane, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.lane_desk

    monkeypatch.setattr(scheduler.lane_desk, "CLAIM_CHUNK", 2)
    ids = lane.submit([{"prompt": f"chunk {i}"} for i in range(5)])
    batch_id = lane.send(ids)
    assert lane.lanes.get(batch_id).jobs == 5  # type: ignore[union-attr]
    assert lane.runner.submit(batch_id)["jobs"] == 5
    lane.runner.poll(batch_id)
    assert {r.state for r in lane.results(ids).values()} == {JobState.SUCCEEDED}
    assert fake.created == 1

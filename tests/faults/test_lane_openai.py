"""The half-price lane against a real OpenAI-compatible Batch API: a second promptbatch
(its own Valkey, job store, scheduler, worker and HTTP API, ``simulated`` behind it)
serves as the ``openai`` provider's base URL. Its Batch API speaks OpenAI's protocol; our
scheduler and worker run as processes, and are killed where a crash hurts most. Every
count is the upstream's own: the batches its Batch API lists, the requests they hold, the
jobs its store accepted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from config.settings import Settings
from jobs.models import JobResult, JobState
from jobs.provider_batches import ProviderBatches
from jobs.queue import connect
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis
from promptbatch.overview import read_overview, render
from tests.conftest import Procs
from tests.helpers import poll
from tests.integration.test_api import KEY_A, Api

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

MODEL = "gpt-4o-mini"
SYSTEM = ("You extract the parties, the dates and the amounts of a contract clause, and "
          "answer in one line. ") * 4


@dataclass
class Upstream:
    """A second promptbatch whose Batch API the lane uses."""

    settings: Settings
    api: Api
    procs: Procs

    def worker(self) -> None:
        self.procs.worker(1, PROMPTBATCH_SIMULATED_TIME_SCALE="0")

    def batches(self) -> list[dict[str, Any]]:
        resp = self.api.a.get("/v1/batches", params={"limit": 100})
        assert resp.status_code == 200, resp.text
        return list(resp.json()["data"])

    def accepted(self) -> int:
        """Jobs the upstream's store accepted (a request of a batch, or a live call)."""
        store = JobStore(self.settings.database_url)
        try:
            return sum(store.count_by_state().values())
        finally:
            store.close()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    with EmbeddedRedis(tmp_path / "up-redis") as server:
        s = Settings(redis_url=server.url, database_url=f"sqlite:///{tmp_path / 'up.db'}",
                     data_dir=tmp_path / "up", model_aliases={MODEL: "simulated|sim-1"},
                     simulated_time_scale=0.0, _env_file=None)  # type: ignore[call-arg]
        store = JobStore(s.database_url)
        store.migrate()
        store.close()
        api = Api(s, max_pending_per_tenant=100_000, api_max_body_bytes=1024 * 1024).start()
        logs = tmp_path / "up-logs"
        logs.mkdir()
        procs = Procs(s, logs)
        procs.scheduler(PROMPTBATCH_MAX_WAIT_MS="[0,0,0,0,20]")
        try:
            yield Upstream(api.settings, api, procs)
        finally:
            procs.stop_all()
            api.stop()


def lane_env(up: Upstream, **extra: str) -> dict[str, str]:
    return {"PROMPTBATCH_BATCH_API": json.dumps({f"openai|{MODEL}": True}),
            "PROMPTBATCH_OPENAI_BASE_URL": f"{up.api.url}/v1",
            "PROMPTBATCH_OPENAI_API_KEY": KEY_A,
            "PROMPTBATCH_OPENAI_PREFIX_STRATEGY": "parallel",
            "PROMPTBATCH_BATCH_API_WAIT_S": "0.3", "PROMPTBATCH_BATCH_API_POLL_MIN_S": "0.2",
            "PROMPTBATCH_BATCH_API_POLL_MAX_S": "0.5",
            "PROMPTBATCH_BATCH_API_SUBMIT_RETRY_S": "3", **extra}


def ours(settings: Settings, up: Upstream) -> Settings:
    return settings.model_copy(update={
        "batch_api": {f"openai|{MODEL}": True}, "openai_base_url": f"{up.api.url}/v1",
        "openai_api_key": SecretStr(KEY_A)})


def bulk(n: int, tag: str) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"{tag} clause {i}"}],
             "provider": "openai", "model": MODEL, "priority": "bulk"} for i in range(n)]


def finals(client: Client, ids: list[str], timeout: float = 90) -> dict[str, JobResult]:
    poll(lambda: all(client.store.get(i).state.final for i in ids),  # type: ignore[union-attr]
         timeout=timeout, interval=0.2, what="every job to end")
    return {i: client.result(i, timeout=10) for i in ids}


def test_bulk_work_goes_through_an_openai_batch_api_and_status_shows_it(
        settings: Settings, procs: Procs, upstream: Upstream) -> None:
    env = lane_env(upstream)
    procs.scheduler(**env)
    procs.worker(2, **env)
    s = ours(settings, upstream)
    with Client(s) as client:
        lane_ids = client.submit_many(bulk(12, "lane"))
        r = connect(s.redis_url)
        # No upstream worker yet: the provider batch stays open, and status shows it.
        seen = poll(lambda: (o := read_overview(r, time.time())) and o.get("lanes")
                    and o["lanes"]["open"] == 1
                    and o["lanes"]["batches"][0]["provider_status"] and o,
                    timeout=60, interval=0.2, what="status to show the provider batch")
        lanes = seen["lanes"]
        assert lanes["jobs"] == 12 and lanes["batches"][0]["state"] == "submitted"
        assert lanes["batches"][0]["provider_status"] in ("in_progress", "validating")
        text = _rendered(seen)
        assert "provider batches (half-price lane): 1 open with 12 jobs" in text
        upstream.worker()
        fast_ids = client.submit_many([
            {**bulk(1, "lane")[0], "priority": "normal"},  # the first lane job's twin
            {**bulk(1, "lane")[0], "lane": "fast"}])
        done = finals(client, lane_ids + fast_ids)
    batch_ids = {done[i].batch_id for i in lane_ids}
    assert len(batch_ids) == 1
    for i in lane_ids:
        assert done[i].state is JobState.SUCCEEDED and done[i].lane == "provider_batch"
        assert done[i].usage is not None and done[i].usage.prompt_tokens > 0
    for i in fast_ids:
        assert done[i].state is JobState.SUCCEEDED and done[i].lane == "fast"
        assert done[i].text == done[lane_ids[0]].text, "a lane answer is a fast-path answer"
    (batch,) = upstream.batches()
    assert batch["status"] == "completed" and batch["metadata"] == {
        "promptbatch_batch": batch_ids.pop()}
    assert batch["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert upstream.accepted() == 14  # 12 batch requests and 2 live calls
    store = JobStore(s.database_url)
    try:
        (rec,) = [b for b in _all_batches(store)]
        assert rec["state"] == "closed" and rec["jobs"] == 12
    finally:
        store.close()


def _rendered(overview: dict[str, Any]) -> str:
    from rich.console import Console

    console = Console(width=160, record=True, force_terminal=False)
    console.print(render(overview))
    return console.export_text()


def _all_batches(store: JobStore) -> list[dict[str, Any]]:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text("SELECT * FROM provider_batches"))
                .mappings()]


def test_a_worker_killed_between_upload_and_record_creates_no_second_batch(
        settings: Settings, procs: Procs, upstream: Upstream, tmp_path: Path) -> None:
    fault = tmp_path / "fault"
    fault.write_text("after_create")
    env = lane_env(upstream, PROMPTBATCH_BATCH_API_TEST_FAULT=str(fault))
    upstream.worker()
    procs.scheduler(**env)
    procs.worker(1, **env)
    with Client(ours(settings, upstream)) as client:
        ids = client.submit_many(bulk(8, "once"))
        done = finals(client, ids)
    assert not fault.exists(), "the worker was not killed where the test meant"
    assert {r.state for r in done.values()} == {JobState.SUCCEEDED}
    assert {r.lane for r in done.values()} == {"provider_batch"}
    (batch,) = upstream.batches()  # the upstream's own count: one batch
    assert batch["request_counts"]["total"] == 8
    assert upstream.accepted() == 8, "a request was sent twice"


def test_a_scheduler_killed_after_claim_or_after_the_record_loses_and_repeats_nothing(
        settings: Settings, procs: Procs, upstream: Upstream, tmp_path: Path) -> None:
    fault = tmp_path / "fault"
    env = lane_env(upstream, PROMPTBATCH_BATCH_API_TEST_FAULT=str(fault),
                   PROMPTBATCH_RECONCILE_GRACE_S="0", PROMPTBATCH_RECONCILE_INTERVAL_S="1",
                   PROMPTBATCH_LEASE_TTL_S="1",
                   PROMPTBATCH_BATCH_API_POLL_MIN_S="2", PROMPTBATCH_BATCH_API_POLL_MAX_S="2")
    upstream.worker()
    s = ours(settings, upstream)
    with Client(s) as client:
        # Wave 1: the scheduler dies between the claim in Redis and the record in SQL.
        fault.write_text("after_claim")
        first = procs.scheduler(**env)
        procs.worker(1, **env)
        ids = client.submit_many(bulk(5, "claimed"))
        assert first.wait(60) == 86 and not fault.exists()
        procs.scheduler(**env)  # the reconciler puts the claimed jobs back
        wave1 = finals(client, ids)
        # Wave 2: the worker dies right after recording the upload, the scheduler before
        # its first poll; a new scheduler polls from the record alone.
        fault.write_text("after_record")
        more = client.submit_many(bulk(6, "recorded"))
        lanes = ProviderBatches(client.store)
        poll(lambda: any(b.state == "submitted" and b.jobs == 6 for b in lanes.open()),
             timeout=60, interval=0.1, what="the second batch's record")
        scheduler = _active_scheduler(procs)
        os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait(10)
        procs.scheduler(**env)
        wave2 = finals(client, more)
    assert not fault.exists()
    assert {r.state for r in (wave1 | wave2).values()} == {JobState.SUCCEEDED}
    assert {r.lane for r in (wave1 | wave2).values()} == {"provider_batch"}
    totals = sorted(b["request_counts"]["total"] for b in upstream.batches())
    assert totals == [5, 6], "a provider batch was created twice"
    assert upstream.accepted() == 11


def _active_scheduler(procs: Procs) -> subprocess.Popen[bytes]:
    alive = [p for p in procs.procs if p.poll() is None and "scheduler" in str(p.args)]
    assert len(alive) == 1
    return alive[0]


def test_cancelling_every_job_cancels_the_batch_upstream_and_a_batch_cancelled_there_runs_fast(
        settings: Settings, procs: Procs, upstream: Upstream) -> None:
    env = lane_env(upstream)
    procs.scheduler(**env)
    procs.worker(1, **env)
    s = ours(settings, upstream)
    with Client(s) as client:
        lanes = ProviderBatches(client.store)
        ids = client.submit_many(bulk(4, "cancel"))
        poll(lambda: any(b.state == "submitted" for b in lanes.open()), timeout=60,
             interval=0.1, what="the provider batch to be submitted")
        assert set(client.cancel_many(ids).values()) == {JobState.CANCELLED}
        (batch,) = poll(lambda: [b for b in upstream.batches()
                                 if b["status"] in ("cancelling", "cancelled")],
                        timeout=60, interval=0.2, what="the batch to be cancelled upstream")
        poll(lambda: not lanes.open(), timeout=60, interval=0.2, what="the record to close")
        assert {client.status(i) for i in ids} == {JobState.CANCELLED}
        # A batch cancelled at the provider (by its operator): its jobs take the fast path.
        more = client.submit_many(bulk(3, "operator"))
        poll(lambda: any(b.state == "submitted" for b in lanes.open()), timeout=60,
             interval=0.1, what="the second provider batch")
        (second,) = [b for b in upstream.batches() if b["id"] != batch["id"]]
        assert upstream.api.a.post(f"/v1/batches/{second['id']}/cancel").status_code == 200
        upstream.worker()
        done = finals(client, more)
    assert {r.state for r in done.values()} == {JobState.SUCCEEDED}
    assert {r.lane for r in done.values()} == {"fast"}
    assert upstream.accepted() == 4 + 3 + 3  # two batches' requests, then 3 live calls


def test_a_bulk_chat_call_is_answered_on_the_fast_path_not_through_a_provider_batch(
        settings: Settings, procs: Procs, upstream: Upstream) -> None:
    """A chat call waits on its connection: a provider batch (up to a day) is not for it,
    whatever its priority. Seen: a call with ``X-Priority: bulk`` went to the lane, the API
    answered 504 after its longest wait, and the SDK's two retries made two more provider
    batches at the provider, each paid for."""
    from openai import OpenAI

    env = lane_env(upstream)
    upstream.worker()
    procs.scheduler(**env)
    procs.worker(1, **env)
    api = Api(ours(settings, upstream)).start()
    try:
        llm = OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, timeout=60)
        raw = llm.chat.completions.with_raw_response.create(
            model=f"openai|{MODEL}", messages=[{"role": "user", "content": "no hurry"}],
            extra_headers={"X-Priority": "bulk"})
        job_id = raw.headers["x-promptbatch-job-id"]
        assert raw.parse().choices[0].message.content
        with Client(api.settings) as client:
            result = client.result(job_id, timeout=10)
    finally:
        api.stop()
    assert result.lane == "fast"
    assert upstream.batches() == [], "a chat call went through a provider batch"
    assert upstream.accepted() == 1

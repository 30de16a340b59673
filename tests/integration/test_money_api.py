"""Money through the HTTP API (a real uvicorn server on loopback, real Redis and SQLite):
402 over a budget, spend scoped to the caller's tenant, the admin routes of budgets, and
cost in what the official openai SDK reads (chat usage, the batch object)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from config.settings import Settings
from jobs import budgets
from producers.accounts import Accounts
from tests.conftest import Procs
from tests.helpers import poll
from tests.integration.test_api import KEY_A, Api, nothing_enqueued

pytestmark = pytest.mark.integration

ADMIN = "admin-key-of-the-operator"
STORED = "pb-StoredKey-with-a-budget-0000"


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings, api_admin_keys={ADMIN: "ops"}, default_provider="simulated",
                 simulated_time_scale=0.0).start()
    yield server
    server.stop()


def test_a_submit_over_a_budget_is_a_402_that_names_it_and_writes_nothing(
        api: Api, r: redis.Redis) -> None:
    admin = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN}"})
    job = {"prompt": "Summarise: " + "words " * 50, "params": {"max_tokens": 100}}
    assert api.a.put("/v1/admin/budgets/tenant/tenant-a",
                     json={"limit_usd": 1, "period": "day"}).status_code == 403
    set_ = admin.put("/v1/admin/budgets/tenant/tenant-a",
                     json={"limit_usd": 0.00001, "period": "month"})
    assert set_.status_code == 200 and set_.json()["limit_usd"] == 0.00001
    bad = admin.put("/v1/admin/budgets/tenant/tenant-a", json={"limit_usd": -1})
    assert bad.status_code == 422 and "limit_usd" in bad.text
    refused = api.a.post("/v1/jobs", json=job)
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert error["budget"]["scope"] == "tenant" and error["budget"]["name"] == "tenant-a"
    assert error["budget"]["period"] == "month" and error["budget"]["resets_at"] > 0
    assert "tenant 'tenant-a'" in error["message"] and "resets at" in error["message"]
    assert nothing_enqueued(r, api.settings)
    assert api.b.post("/v1/jobs", json=job).status_code == 201  # another tenant: no budget
    admin.close()


def test_a_402_for_a_small_budget_shows_its_amounts_as_they_are(api: Api) -> None:
    """Amounts below a cent (a job on a small model costs a few millionths of a dollar) are
    shown with the digits that tell them apart, never as $0.00 or $0.0000."""
    admin = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN}"})
    job = {"prompt": "Summarise: " + "words " * 50, "params": {"max_tokens": 100}}
    assert admin.put("/v1/admin/budgets/tenant/tenant-a",
                     json={"limit_usd": 0.0001, "period": "month"}).status_code == 200
    assert api.a.post("/v1/jobs", json=job).status_code == 201  # reserved, not yet run
    refused = api.a.post("/v1/jobs", json=job)
    admin.close()
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    shown = [float(x.replace(",", "")) for x in re.findall(r"\$([0-9.,]+[0-9])", error["message"])]
    budget = error["budget"]
    real = [budget["limit_usd"], budget["spent_usd"], budget["reserved_usd"],
            budget["needed_usd"]]
    assert budget["reserved_usd"] > 0 and budget["needed_usd"] > 0
    assert len(shown) == 4, error["message"]
    for seen, amount in zip(shown, real, strict=True):
        # to 1%, or to the millionth of a dollar the API's amounts are rounded to
        assert abs(seen - amount) <= max(0.01 * amount, 5e-7), (seen, amount, error["message"])


def test_a_keys_budget_holds_for_that_key_alone(api: Api, settings: Settings) -> None:
    from jobs.store import JobStore

    store = JobStore(settings.database_url)
    Accounts(store).add_key(STORED, "tenant-a")
    budgets.set_budget(store.engine, "key", STORED[:11], 0.00001, "none")
    store.close()
    job = {"prompt": "Summarise: " + "words " * 50}
    with httpx.Client(base_url=api.url, headers={"X-API-Key": STORED}) as keyed:
        refused = keyed.post("/v1/jobs", json=job)
    assert refused.status_code == 402
    assert f"API key {STORED[:11]}" in refused.json()["error"]["message"]
    assert "does not reset" in refused.json()["error"]["message"]
    assert api.a.post("/v1/jobs", json=job).status_code == 201  # the tenant's other key


def test_spend_is_scoped_to_the_callers_tenant(api: Api, procs: Procs) -> None:
    procs.scheduler()
    procs.worker(PROMPTBATCH_SIMULATED_TIME_SCALE="0")
    ids = [api.a.post("/v1/jobs", json={"prompt": f"job {i} " * 40, "provider": "simulated",
                                        "cache": "off"}).json()["id"] for i in range(3)]
    ids.append(api.b.post("/v1/jobs", json={"prompt": "other " * 40, "provider": "simulated",
                                            "cache": "off"}).json()["id"])
    costs = {}
    for job_id, c in zip(ids, [api.a] * 3 + [api.b], strict=True):
        done = c.get(f"/v1/jobs/{job_id}/result", params={"wait": 30}).json()
        costs[job_id] = done["usage"]["cost_usd"]
    mine = api.a.get("/v1/spend", params={"by": "deployment"}).json()
    assert mine["tenant"] == "tenant-a"
    assert [row["group"] for row in mine["data"]] == ["simulated|sim-1"]
    assert mine["data"][0]["jobs"] == 3
    assert mine["cost_usd"] == pytest.approx(sum(costs[i] for i in ids[:3]), abs=1e-6)
    assert api.b.get("/v1/spend", params={"tenant": "tenant-a"}).status_code == 403
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        every = admin.get("/v1/spend", params={"by": "tenant"}).json()
    assert [row["group"] for row in every["data"]] == ["tenant-a", "tenant-b"]
    bad = api.a.get("/v1/spend", params={"since": "yesterday"})
    assert bad.status_code == 422 and "since" in bad.text


def test_the_openai_sdk_reads_cost_in_chat_usage_and_in_the_batch_object(
        api: Api, procs: Procs, tmp_path: Path) -> None:
    from openai import OpenAI

    procs.scheduler()
    procs.worker(PROMPTBATCH_SIMULATED_TIME_SCALE="0")
    llm = OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
    answer = llm.chat.completions.create(
        model="simulated|sim-1", max_tokens=20,
        messages=[{"role": "user", "content": "Hello there " * 30}])
    assert answer.usage is not None
    cost = getattr(answer.usage, "cost_usd", None)
    assert isinstance(cost, float) and cost > 0
    assert getattr(answer.usage, "saved_usd", None) is not None
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "simulated|sim-1", "max_tokens": 10,
                       "messages": [{"role": "user", "content": f"Item {i} " * 20}]}}
             for i in range(4)]
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = llm.files.create(file=src.open("rb"), purpose="batch")
    batch = llm.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    poll(lambda: llm.batches.retrieve(batch.id).status == "completed", timeout=60,
         interval=0.2, what="the batch to complete")
    done = llm.batches.retrieve(batch.id)
    assert done.usage is not None and done.usage.input_tokens > 0
    out = [json.loads(x) for x in llm.files.content(done.output_file_id or "").text.splitlines()]
    line_costs = [o["response"]["body"]["usage"]["cost_usd"] for o in out]
    assert getattr(done.usage, "cost_usd", None) == pytest.approx(sum(line_costs), abs=1e-6)
    assert isinstance(getattr(done.usage, "saved_by_reason", None), dict)


def test_the_openai_sdk_gets_a_402_once_that_states_a_small_budget(
        api: Api, settings: Settings) -> None:
    """A key's budget of a fifth of a cent a day, through the chat endpoint: the SDK
    raises at once (no retry: one request sent) and the message states the budget as
    set (it said '$0.00 a day', a budget that seemed to be nothing)."""
    from openai import APIStatusError, OpenAI

    from jobs.store import JobStore

    store = JobStore(settings.database_url)
    Accounts(store).add_key(STORED, "tenant-a")
    budgets.set_budget(store.engine, "key", STORED[:11], 0.002, "day")
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    llm = OpenAI(base_url=f"{api.url}/v1", api_key=STORED, http_client=http)  # retries on
    ask = {"model": "simulated|sim-1", "max_tokens": 4000,
           "messages": [{"role": "user", "content": "Summarise: " + "words " * 50}]}
    with pytest.raises(APIStatusError) as refused:
        llm.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert refused.value.status_code == 402 and len(sent) == 1
    message = refused.value.body["message"]  # type: ignore[index]  # the SDK's error body
    assert message.startswith(f"the budget of API key {STORED[:11]} is $0.002 a day: "
                              "$0.0000 spent today")
    budgets.set_budget(store.engine, "key", STORED[:11], 1.0, "day")
    budgets.set_budget(store.engine, "tenant", "tenant-a", 0.00002, "month")
    store.close()
    with pytest.raises(APIStatusError) as tenant:
        llm.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert tenant.value.body["message"].startswith(  # type: ignore[index]
        "the budget of tenant 'tenant-a' is $0.00002 a month")
    http.close()

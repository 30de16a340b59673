"""What the HTTP API answers a caller who asks for something it cannot have: a cancel by
the caller's own id, a cancel that comes too late, errors that name each field as the
caller wrote it, and models the deployment cannot call (a real uvicorn server on
loopback, real Redis and SQLite)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import redis
from pydantic import SecretStr

from config import keys
from config.settings import Settings
from jobs.models import JobResult, JobState
from jobs.outcomes import record_results
from jobs.queue import RedisQueue
from jobs.store import JobStore
from promptbatch.http import Client as HttpClient
from tests.integration.test_api import KEY_A, Api, nothing_enqueued

pytestmark = pytest.mark.integration


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings).start()
    yield server
    server.stop()


def test_a_job_is_cancelled_by_the_callers_own_id(api: Api, settings: Settings) -> None:
    job = api.a.post("/v1/jobs", json={"prompt": "later", "client_id": "ticket-9"}).json()["id"]
    other = api.b.post("/v1/jobs", json={"prompt": "b's", "client_id": "ticket-9"}).json()["id"]
    resp = api.a.delete("/v1/jobs/ticket-9")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": job, "state": "CANCELLED"}
    store = JobStore(settings.database_url)
    assert store.get(job).state is JobState.CANCELLED  # type: ignore[union-attr]
    assert store.get(other).state is JobState.QUEUED  # type: ignore[union-attr]
    store.close()
    assert api.a.delete("/v1/jobs/no-such-id").status_code == 404


def test_a_cancel_that_comes_too_late_is_a_409_in_the_error_shape(
        api: Api, settings: Settings, r: redis.Redis) -> None:
    job = api.a.post("/v1/jobs", json={"prompt": "done already"}).json()["id"]
    store = JobStore(settings.database_url)
    record_results(store, RedisQueue(r), [JobResult(id=job, state=JobState.SUCCEEDED,
                                                    text="answer")],
                   ["tenant-a"], result_ttl_s=600)
    store.close()
    resp = api.a.delete(f"/v1/jobs/{job}")
    assert resp.status_code == 409, resp.text
    error = resp.json()["error"]
    assert error["type"] == "conflict" and error["state"] == "SUCCEEDED" and error["id"] == job
    assert "already ended SUCCEEDED" in error["message"]
    assert resp.json()["state"] == "SUCCEEDED"  # where HTTP SDKs before this one read it
    with HttpClient(api.url, KEY_A) as pb:  # the SDK reads the state from it
        assert pb.cancel(job) == "SUCCEEDED"


@pytest.mark.parametrize(("path", "body", "headers", "field"), [
    ("/v1/jobs", {"prompt": ""}, {}, "prompt"),
    ("/v1/chat/completions", {"max_tokens": 0}, {}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 2_000_000}, {}, "max_completion_tokens"),
    ("/v1/chat/completions", {"temperature": 7}, {}, "temperature"),
    ("/v1/chat/completions", {"stop": ["ok", ""]}, {}, "stop.1"),
    ("/v1/chat/completions", {}, {"X-Priority": "urgent"}, "X-Priority"),
    ("/v1/chat/completions", {}, {"X-Timeout-S": "-3"}, "X-Timeout-S"),
    ("/v1/chat/completions", {}, {"X-Deadline": "tomorrow"}, "X-Deadline"),
    ("/v1/completions", {"max_tokens": 0}, {}, "max_tokens"),
])
def test_an_error_names_the_field_as_the_caller_wrote_it(
        api: Api, r: redis.Redis, path: str, body: dict[str, object],
        headers: dict[str, str], field: str) -> None:
    if path != "/v1/jobs":
        body = {"model": "echo-1", **({"messages": [{"role": "user", "content": "x"}]}
                                      if "chat" in path else {"prompt": "x"}), **body}
    resp = api.a.post(path, json=body, headers=headers)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert [e["field"] for e in error["errors"]] == [field], resp.text
    assert error["message"].startswith(f"{field}: ") or error["message"].startswith(
        f"invalid job: {field}: "), error["message"]
    assert "line 1" not in error["message"] and "params." not in resp.text
    assert nothing_enqueued(r, api.settings)


def test_models_without_credentials_are_not_listed_and_refused_at_submit(
        settings: Settings, r: redis.Redis) -> None:
    api = Api(settings, model_aliases={"gpt": "openai|gpt-4o-mini", "fast": "echo|echo-1"}
              ).start()  # no PROMPTBATCH_OPENAI_API_KEY, no ANTHROPIC key, default URLs
    try:
        sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
        listed = [m.id for m in sdk.models.list()]
        assert listed == ["fast", "echo|echo-1", "simulated|sim-1"], listed
        with pytest.raises(openai.NotFoundError) as refused:
            sdk.chat.completions.create(model="gpt", messages=[{"role": "user",
                                                                "content": "hi"}])
        assert "PROMPTBATCH_OPENAI_API_KEY" in refused.value.message
        resp = api.a.post("/v1/jobs", json={"prompt": "hi", "provider": "anthropic"})
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["errors"][0]["field"] == "provider"
        assert "anthropic|claude-haiku-4-5" in error["message"]
        assert "PROMPTBATCH_ANTHROPIC_API_KEY" in error["message"]
        assert nothing_enqueued(r, api.settings)
    finally:
        api.stop()


@pytest.mark.parametrize("update", [
    {"openai_api_key": SecretStr("sk-test")},  # the vendor's API, with its key
    {"openai_base_url": "http://127.0.0.1:9/v1"},  # a local vLLM or llama.cpp: no key
])
def test_a_deployment_that_can_be_called_is_listed_and_accepted(
        settings: Settings, r: redis.Redis, update: dict[str, object]) -> None:
    api = Api(settings, **update).start()
    try:
        listed = [m["id"] for m in api.a.get("/v1/models").json()["data"]]
        assert "openai|gpt-4o-mini" in listed and "anthropic|claude-haiku-4-5" not in listed
        resp = api.a.post("/v1/jobs", json={"prompt": "hi", "provider": "openai"})
        assert resp.status_code == 201, resp.text
        assert r.xlen(keys.INTAKE) == 1
    finally:
        api.stop()

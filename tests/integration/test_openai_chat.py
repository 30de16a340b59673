"""The OpenAI-compatible endpoints, called with the official ``openai`` SDK against a real
``promptbatch api``: only ``base_url`` and ``api_key`` change."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from promptbatch.embedded import free_port
from tests.conftest import Procs
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def api(settings: Settings, procs: Procs) -> Iterator[str]:
    port = free_port()
    proc = procs.spawn("api", "--port", str(port),
                       PROMPTBATCH_API_KEYS=json.dumps({"key-a": "acme"}),
                       PROMPTBATCH_MODEL_ALIASES=json.dumps({"fast": "echo|echo-1"}))
    base = f"http://127.0.0.1:{port}"
    poll(lambda: _status(f"{base}/readyz") == 200, timeout=60, interval=0.1, what="the API",
         proc=proc)
    yield f"{base}/v1"


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_the_sdk_gets_answers_in_openai_shape(settings: Settings, procs: Procs,
                                             api: str) -> None:
    procs.scheduler()
    procs.worker(1)
    sdk = openai.OpenAI(base_url=api, api_key="key-a", max_retries=0)
    chat = sdk.chat.completions.create(
        model="fast", temperature=0, max_tokens=64,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a prime."}])
    assert chat.object == "chat.completion" and chat.model == "fast"
    content = chat.choices[0].message.content or ""
    assert content.startswith("echo: ") and "Name a prime." in content
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    assert chat.usage.prompt_tokens_details is not None
    job_id = chat.id.removeprefix("chatcmpl-")
    with Client(settings) as client:
        stored = client.store.get(job_id)
        assert stored is not None and stored.spec.tenant == "acme"  # the key's tenant
        assert stored.spec.params.max_tokens == 64 and stored.spec.params.temperature == 0
    text = sdk.completions.create(model="echo|echo-1", prompt="Hello there")
    assert text.choices[0].text == "echo: Hello there"
    # A repeat of a deterministic call is answered from the cache.
    again = sdk.chat.completions.with_raw_response.create(
        model="fast", temperature=0, max_tokens=64,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a prime."}])
    assert json.loads(again.text)["promptbatch"]["cache"] == "exact"


def test_refusals_map_to_the_sdks_exceptions_and_are_not_retried(
        settings: Settings, procs: Procs, api: str) -> None:
    procs.scheduler()
    procs.worker(1)
    sdk = openai.OpenAI(base_url=api, api_key="key-a")  # the SDK's default retries
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="nobody|nothing",
                                    messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        sdk.chat.completions.create(model="fast", temperature=5,
                                    messages=[{"role": "user", "content": "hi"}])
    assert "temperature" in str(bad.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api, api_key="wrong", max_retries=0).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}])
    # A deadline that passes: 504 (the SDK's InternalServerError), and no retry (one job).
    with pytest.raises(openai.InternalServerError) as late:
        sdk.chat.completions.create(model="fast", messages=[{"role": "user",
                                                              "content": "too late"}],
                                    extra_headers={"X-Timeout-S": "0.001"})
    assert late.value.status_code == 504
    with Client(settings) as client:
        rows = client.store.list_jobs("acme", state=JobState.EXPIRED, limit=10)
    assert len(rows) == 1


def test_a_critical_call_overtakes_a_bulk_backlog(settings: Settings, procs: Procs,
                                                  api: str) -> None:
    procs.scheduler()
    with Client(settings) as client:
        bulk = client.submit_many([{"prompt": f"bulk job {i}", "priority": "bulk",
                                    "tenant": "acme"} for i in range(400)])
    answer: dict[str, Any] = {}

    def call() -> None:
        sdk = openai.OpenAI(base_url=api, api_key="key-a", max_retries=0)
        answer["chat"] = sdk.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "urgent"}],
            extra_headers={"X-Priority": "critical"})
        answer["at"] = time.time()

    caller = threading.Thread(target=call)
    caller.start()
    with Client(settings) as client:
        poll(lambda: client.store.list_jobs("acme", state=JobState.QUEUED, limit=500)
             and len(client.store.list_jobs("acme", limit=500)) == 401, timeout=30,
             what="the call's job to be queued behind the backlog")
        procs.worker(1)  # the backlog and the call meet the worker together
        caller.join(60)
        done = [r for r in client.results(bulk, timeout=120)]
    assert "chat" in answer
    later = sum(1 for r in done if r.finished_at > answer["at"])
    assert later >= 300, f"only {later} of 400 bulk jobs finished after the critical call"

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
from jobs.models import JobState, Priority
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
        # When the call's job ended (its own result), not when its answer reached this
        # process: on a loaded machine the API's reply can lag while the worker goes on.
        [urgent] = [j for j in client.store.list_jobs("acme", limit=500)
                    if j.spec.priority == Priority.CRITICAL]
    assert "chat" in answer
    assert urgent.result is not None
    later = sum(1 for r in done if r.finished_at > urgent.result.finished_at)
    assert later >= 300, f"only {later} of 400 bulk jobs finished after the critical job"


SLOW = "[echo:chunk_ms=150] one two three four five six seven eight"


def test_a_streamed_call_gets_its_first_tokens_before_the_provider_finishes(
        settings: Settings, procs: Procs, api: str) -> None:
    procs.scheduler()
    procs.worker(1)
    sdk = openai.OpenAI(base_url=api, api_key="key-a", max_retries=0)
    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    usage = None
    for chunk in sdk.chat.completions.create(
            model="fast", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": SLOW}]):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                arrivals.append((time.monotonic() - started, choice.delta.content))
    text = "".join(t for _, t in arrivals)
    assert text == f"echo: user: {SLOW}"  # the same text as without streaming
    # Ten words 150 ms apart: the first ones arrive well before the last.
    assert arrivals[-1][0] - arrivals[0][0] >= 1.0
    assert len(arrivals) >= 8
    assert usage is not None and usage.completion_tokens > 0


def test_a_job_stream_resumes_after_the_last_event_id(settings: Settings, procs: Procs,
                                                      api: str) -> None:
    procs.scheduler()
    procs.worker(1)
    base = api.removesuffix("/v1")
    headers = {"Authorization": "Bearer key-a"}
    job = httpx.post(f"{base}/v1/jobs", headers=headers,
                     json={"prompt": SLOW, "stream": True}).json()["id"]
    seen: list[tuple[str, str, str]] = []

    def read(extra: dict[str, str], stop_after: int | None) -> None:
        with httpx.stream("GET", f"{base}/v1/jobs/{job}/stream", headers={**headers, **extra},
                          timeout=30) as resp:
            assert resp.status_code == 200
            event: dict[str, str] = {}
            for line in resp.iter_lines():
                if line.startswith(("id: ", "event: ", "data: ")):
                    k, _, v = line.partition(": ")
                    event[k] = v
                elif not line and event:
                    seen.append((event["id"], event["event"], event["data"]))
                    event = {}
                    chunks = sum(1 for s in seen if s[1] == "chunk")
                    if seen[-1][1] == "end" or (stop_after and chunks >= stop_after):
                        return

    read({}, stop_after=3)  # a reader that goes away after three chunks...
    read({"Last-Event-ID": seen[-1][0]}, stop_after=None)  # ...and comes back
    kinds = [k for _, k, _ in seen]
    assert kinds[0] == "attempt" and kinds[-1] == "end" and kinds.count("attempt") == 1
    ids = [i for i, _, _ in seen]
    assert len(ids) == len(set(ids))  # nothing twice
    text = "".join(json.loads(d)["text"] for _, k, d in seen if k == "chunk")
    with Client(settings) as client:
        assert text == client.result(job, timeout=30).text


def test_a_worker_killed_mid_stream_restarts_the_stream_with_a_discard_event(
        settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    procs.worker(1)
    with Client(settings) as client:
        job = client.submit("[echo:chunk_ms=20] [echo:crash_after=3] " + "word " * 20,
                            stream=True)
        from jobs.streams import text_of

        events = list(client.stream(job))
        result = client.result(job, timeout=60)
    kinds = [e.kind for e in events]
    assert kinds.count("attempt") == 2  # the killed attempt, then the retry
    first_attempt = kinds[:kinds.index("attempt", 1)]
    assert first_attempt.count("chunk") == 3  # what readers saw before the kill
    assert result.state is JobState.SUCCEEDED
    assert text_of(events) == result.text  # after discarding the killed attempt's text


def test_a_caller_that_goes_away_before_its_job_started_cancels_it(
        settings: Settings, procs: Procs, api: str) -> None:
    procs.scheduler()  # no worker: the job cannot start
    sdk = openai.OpenAI(base_url=api, api_key="key-a", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        sdk.chat.completions.create(model="fast", messages=[{"role": "user",
                                                             "content": "never mind"}])
    with Client(settings) as client:
        poll(lambda: client.store.list_jobs("acme", state=JobState.CANCELLED, limit=5),
             timeout=15, interval=0.1, what="the abandoned job to be cancelled")


def test_a_caller_with_an_idempotency_key_that_goes_away_gets_its_answer_on_retry(
        settings: Settings, procs: Procs, api: str) -> None:
    """The key says the caller will come back for the job: its going away (the SDK's
    timeout) leaves the job queued, and the retry with the key gets the answer (it was
    cancelled, and every retry with that key answered 409 'cancelled')."""
    procs.scheduler()  # no worker yet: the job cannot start
    ask = {"model": "fast", "messages": [{"role": "user", "content": "worth the wait"}],
           "extra_headers": {"Idempotency-Key": "order-7"}}
    impatient = openai.OpenAI(base_url=api, api_key="key-a", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(**ask)  # type: ignore[call-overload]
    procs.worker(1)  # seconds: the API saw the caller go long before
    sdk = openai.OpenAI(base_url=api, api_key="key-a", max_retries=0, timeout=30)
    answer = sdk.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert answer.choices[0].message.content == "echo: user: worth the wait"
    with Client(settings) as client:
        jobs = client.store.list_jobs("acme", limit=10)
    assert [j.spec.id for j in jobs] == [answer.id.removeprefix("chatcmpl-")]
    assert settings.echo_call_log is not None
    assert len(settings.echo_call_log.read_text().splitlines()) == 1  # one provider call


def test_an_openai_compatible_provider_streams_through_promptbatch(
        settings: Settings, procs: Procs) -> None:
    from tests.fake_llm import FakeServer

    with FakeServer() as fake:
        fake.token_delay_s = 0.06
        env = {"PROMPTBATCH_OPENAI_BASE_URL": f"{fake.url}/v1"}
        procs.scheduler(**env)
        procs.worker(1, **env)
        port = free_port()
        proc = procs.spawn("api", "--port", str(port),
                           PROMPTBATCH_API_KEYS=json.dumps({"key-a": "acme"}),
                           PROMPTBATCH_MODEL_ALIASES=json.dumps({"gpt": "openai|gpt-test"}),
                           **env)
        base = f"http://127.0.0.1:{port}"
        poll(lambda: _status(f"{base}/readyz") == 200, timeout=60, interval=0.1,
             what="the API", proc=proc)
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="key-a", max_retries=0)
        start = time.monotonic()
        arrivals: list[tuple[float, str]] = []
        job_id = ""
        for chunk in sdk.chat.completions.create(
                model="gpt", stream=True, messages=[{"role": "user", "content": "Stream!"}]):
            job_id = chunk.id.removeprefix("chatcmpl-")
            for choice in chunk.choices:
                if choice.delta.content:
                    arrivals.append((time.monotonic() - start, choice.delta.content))
        served = fake.requests_for("Stream!")
        assert len(served) == 1 and served[0].body.get("stream") is True
        # The first tokens reached the caller while the provider was still answering.
        assert arrivals[0][0] < served[0].end - start - 0.3
        text = "".join(t for _, t in arrivals)
        assert text.startswith("re: Stream!") and len(arrivals) == fake.stream_words
        with Client(settings) as client:
            res = client.result(job_id, timeout=10)
        assert res.text == text and res.usage is not None and res.usage.cached_tokens == 8


def test_a_streamed_json_answer_asked_again_reaches_the_sdk_whole_and_valid(
        settings: Settings, procs: Procs) -> None:
    """A streamed call with a JSON Schema whose first answer does not validate: the worker
    asks again and the job ends SUCCEEDED; the SDK's stream gets the valid answer (OpenAI's
    stream cannot take back text, so nothing of the first answer may reach it)."""
    from pydantic import BaseModel

    from tests.fake_llm import FakeServer

    class Author(BaseModel):
        name: str

    with FakeServer() as fake:
        fake.token_delay_s = 0.01
        fake.script("Who wrote Faust?", ["ok", "json"])  # prose first, then the JSON
        env = {"PROMPTBATCH_OPENAI_BASE_URL": f"{fake.url}/v1"}
        procs.scheduler(**env)
        procs.worker(1, **env)
        port = free_port()
        proc = procs.spawn("api", "--port", str(port),
                           PROMPTBATCH_API_KEYS=json.dumps({"key-a": "acme"}), **env)
        base = f"http://127.0.0.1:{port}"
        poll(lambda: _status(f"{base}/readyz") == 200, timeout=60, interval=0.1,
             what="the API", proc=proc)
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="key-a", max_retries=0)
        with sdk.chat.completions.stream(
                model="openai|gpt-test", response_format=Author,
                messages=[{"role": "user", "content": "Who wrote Faust?"}]) as stream:
            streamed = "".join(e.delta for e in stream if e.type == "content.delta")
            final = stream.get_final_completion()
        assert len(fake.requests_for("Who wrote Faust?")) == 2  # asked again once
        assert final.choices[0].message.parsed == Author(name="Goethe")
        assert json.loads(streamed) == {"name": "Goethe"}
        job_id = final.id.removeprefix("chatcmpl-")
        with Client(settings) as client:
            res = client.result(job_id, timeout=10)
        assert res.state is JobState.SUCCEEDED and res.schema_retries == 1
        assert res.parsed == {"name": "Goethe"} and res.text == streamed


def test_a_call_longer_than_the_apis_longest_wait_is_not_sent_again_by_the_sdk(
        settings: Settings, procs: Procs) -> None:
    """The API stops waiting after ``api_max_wait_s`` and answers 504 while the job keeps
    running: the SDK must not send the call again, as a new job (seen: three jobs, three
    provider calls, for one call of the SDK with its default two retries)."""
    port = free_port()
    proc = procs.spawn("api", "--port", str(port),
                       PROMPTBATCH_API_KEYS=json.dumps({"key-a": "acme"}),
                       PROMPTBATCH_API_MAX_WAIT_S="1")
    poll(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, timeout=60,
         interval=0.1, what="the API", proc=proc)
    procs.scheduler()
    procs.worker(1)
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="key-a")
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(model="echo|echo-1", messages=[
            {"role": "user", "content": "[echo:sleep=3] take your time"}])
    assert raised.value.status_code == 504
    job_id = raised.value.response.headers["x-promptbatch-job-id"]
    assert job_id in raised.value.message  # where its result will be
    with Client(settings) as client:
        assert client.result(job_id, timeout=30).state is JobState.SUCCEEDED
        assert sum(client.store.count_by_state().values()) == 1, "the call was sent again"


def test_an_answer_that_never_validated_comes_back_beside_its_502(
        settings: Settings, procs: Procs) -> None:
    """A chat call whose job ends FAILED ``invalid_output`` answers 502 with the error and,
    beside it, the answer as the provider wrote it (as a Batch API error line keeps it):
    the caller sees what the model said, not only that it broke the schema."""
    port = free_port()
    proc = procs.spawn("api", "--port", str(port),
                       PROMPTBATCH_API_KEYS=json.dumps({"key-a": "acme"}))
    poll(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, timeout=60,
         interval=0.1, what="the API", proc=proc)
    procs.scheduler()
    procs.worker(1, PROMPTBATCH_SIMULATED_INVALID_RATE="1",
                 PROMPTBATCH_SIMULATED_TIME_SCALE="0")
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="key-a",
                        max_retries=0)
    schema: Any = {"name": "person", "schema": {"type": "object", "required": ["name"],
                                                "properties": {"name": {"type": "string"}}}}
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(
            model="simulated|sim-1", response_format={"type": "json_schema",
                                                      "json_schema": schema},
            messages=[{"role": "user", "content": "Ada Lovelace, born 1815"}])
    assert raised.value.status_code == 502
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "invalid_output"
    job_id = raised.value.response.headers["x-promptbatch-job-id"]
    with Client(settings) as client:
        res = client.result(job_id, timeout=10)
    assert res.state is JobState.FAILED and res.error_code == "invalid_output" and res.text
    answered = raised.value.response.json()
    assert answered["object"] == "chat.completion"
    assert answered["choices"][0]["message"]["content"] == res.text
    assert answered["usage"]["prompt_tokens"] > 0

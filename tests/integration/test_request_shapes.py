"""Requests with OpenAI's shapes (content parts, tools, tool calls and results, response
formats, log probabilities) on every path, against a real API on loopback, a real
Redis-compatible server and a SQLite file: what is wrong or unserved is a 422 (or a line
error) naming the field as the caller wrote it, and nothing is enqueued; what is right is
accepted and reaches the job (and the provider) intact, also through the official
``openai`` SDK and promptbatch's own clients."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel

from config.settings import Settings
from jobs.chat import Message, ResponseFormat, Tool
from jobs.errors import InvalidJob
from jobs.models import JobRequest, JobSpec
from jobs.store import JobStore
from producers.client import Client
from promptbatch import http as pb_http
from tests.conftest import Procs
from tests.helpers import poll
from tests.integration.test_api import KEY_A, Api, fields, nothing_enqueued

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
SCHEMA: dict[str, Any] = {"type": "json_schema", "json_schema": {
    "name": "person", "strict": True, "schema": {
        "type": "object", "properties": {"name": {"type": "string"}},
        "required": ["name"], "additionalProperties": False}}}
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42"
         "mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
PARTS: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "What is on this badge?"},
                                 {"type": "image_url",
                                  "image_url": {"url": PIXEL, "detail": "low"}}]}]
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 4}"},
]
ANTHROPIC = "anthropic|claude-haiku-4-5"


def image(decoded_bytes: int) -> dict[str, Any]:
    data = base64.b64encode(b"\x89PNG" + b"\0" * (decoded_bytes - 4)).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def user_with(img: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe it."}, img]}]


def bad_schema() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {
        "name": "person", "schema": {"type": "object", "required": "name"}}}


def bad_tool() -> dict[str, Any]:
    return {**TOOL, "function": {**TOOL["function"], "name": "get weather!"}}


UNANSWERED = [{"role": "user", "content": "hi"},
              {"role": "tool", "tool_call_id": "call_9", "content": "4"}]


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings, api_max_body_bytes=40 * MiB, api_max_request_bytes=8 * MiB).start()
    yield server
    server.stop()


def stored(settings: Settings, job_id: str) -> JobSpec:
    store = JobStore(settings.database_url)
    try:
        row = store.get(job_id)
        assert row is not None, job_id
        return row.spec
    finally:
        store.close()


def dumped(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda m: m.model_dump(
        mode="json", exclude_none=True)))


def sent(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a job keeps them and a provider gets them: a null content left out."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


# --- POST /v1/jobs --------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x", "response_format": bad_schema()}, "response_format.json_schema.schema"),
    ({"prompt": "x", "tools": [bad_tool()]}, "tools.0.function.name"),
    ({"prompt": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"messages": UNANSWERED}, "messages.1.tool_call_id"),
    ({"prompt": "x", "provider": "anthropic", "params": {"logprobs": True}},
     "params.logprobs"),
    ({"messages": user_with(image(5 * MiB + 1)), "provider": "anthropic"},
     "messages.0.content.1.image_url.url"),
    ({"jobs": [{"prompt": "fine"}, {"prompt": "x", "tools": [bad_tool()]}]},
     "jobs.1.tools.0.function.name"),
])
def test_bad_shapes_on_v1_jobs_are_refused_naming_the_field_and_nothing_is_enqueued(
        api: Api, r: redis.Redis, body: dict[str, Any], field: str) -> None:
    resp = api.a.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    assert field in fields(resp), resp.text
    assert nothing_enqueued(r, api.settings)


def test_every_shape_on_v1_jobs_is_accepted_and_kept_intact(api: Api,
                                                            settings: Settings) -> None:
    body = {"messages": CONVERSATION + PARTS, "tools": [TOOL], "tool_choice": "auto",
            "parallel_tool_calls": False, "response_format": SCHEMA,
            "params": {"temperature": 0, "logprobs": True, "top_logprobs": 2}}
    resp = api.a.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    spec = stored(settings, resp.json()["id"])
    assert dumped(spec.messages) == sent(CONVERSATION + PARTS)
    assert dumped(spec.tools) == [TOOL] and dumped(spec.response_format) == SCHEMA
    assert spec.tool_choice == "auto" and spec.parallel_tool_calls is False
    assert spec.params.logprobs is True and spec.params.top_logprobs == 2


# --- POST /v1/chat/completions ----------------------------------------------------------------

def chat(**fields_: Any) -> dict[str, Any]:
    return {"model": "echo|echo-1", "messages": [{"role": "user", "content": "hi"}],
            **fields_}


@pytest.mark.parametrize(("body", "field"), [
    (chat(response_format=bad_schema()), "response_format.json_schema.schema"),
    (chat(tools=[bad_tool()]), "tools.0.function.name"),
    (chat(tools=[{"type": "file_search"}]), "tools.0.type"),
    (chat(messages=UNANSWERED), "messages.1.tool_call_id"),
    (chat(messages=[{"role": "user", "content": [{"type": "file", "file": {}}]}]),
     "messages.0.content.0.type"),
    (chat(n=2), "n"),
    (chat(audio={"voice": "alloy", "format": "wav"}, modalities=["text", "audio"]), "audio"),
    (chat(functions=[TOOL["function"]]), "functions"),
    (chat(function_call="auto"), "function_call"),
    (chat(prediction={"type": "content", "content": "x"}), "prediction"),
    (chat(web_search_options={}), "web_search_options"),
    (chat(logit_bias={"50256": -100}), "logit_bias"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(temperature=7), "temperature"),
    (chat(model=ANTHROPIC, logprobs=True, top_logprobs=1), "logprobs"),
    (chat(model=ANTHROPIC, seed=3), "seed"),
    (chat(model=ANTHROPIC, messages=user_with(image(5 * MiB + 1))),
     "messages.0.content.1.image_url.url"),
])
def test_bad_shapes_on_chat_completions_are_refused_naming_the_openai_field(
        api: Api, r: redis.Redis, body: dict[str, Any], field: str) -> None:
    resp = api.a.post("/v1/chat/completions", json=body)
    assert resp.status_code == 422, resp.text[:500]
    assert field in fields(resp), resp.text[:500]
    assert nothing_enqueued(r, api.settings)


def test_the_sdk_gets_a_422_it_does_not_retry_for_an_unserved_field(api: Api) -> None:
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A)  # the SDK's retries on
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        sdk.chat.completions.create(model="echo|echo-1", n=2,
                                    messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body is not None and "n" in json.dumps(bad.value.body)


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.slow
def test_the_openai_sdk_sends_every_shape_and_gets_no_422(
        api: Api, settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    procs.worker(1)
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
    calls: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [TOOL],
         "tool_choice": "required", "parallel_tool_calls": False},
        {"messages": [{"role": "user", "content": "Who wrote Hamlet?"}],
         "response_format": SCHEMA},
        # What .parse(response_format=Person) sends.
        {"messages": [{"role": "user", "content": "Ada, 36"}],
         "response_format": type_to_response_format_param(Person)},
        {"messages": [{"role": "user", "content": "Any JSON"}],
         "response_format": {"type": "json_object"}},
        {"messages": PARTS},
        {"messages": CONVERSATION, "tools": [TOOL]},
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
    ]
    for call in calls:
        raw = sdk.chat.completions.with_raw_response.create(model="echo|echo-1", **call)
        assert raw.http_response.status_code == 200
        raw.parse()  # the SDK reads the answer
        spec = stored(settings, raw.headers["x-promptbatch-job-id"])
        assert dumped(spec.messages) == sent(call["messages"])
        for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
            assert dumped(getattr(spec, name)) == call.get(name), name
        assert spec.params.logprobs == call.get("logprobs")
        assert spec.params.top_logprobs == call.get("top_logprobs")


@pytest.mark.slow
def test_a_tool_conversation_with_parts_reaches_an_openai_compatible_upstream_intact(
        settings: Settings, procs: Procs) -> None:
    from tests.fake_llm import FakeServer

    with FakeServer() as fake:
        env = {"PROMPTBATCH_OPENAI_BASE_URL": f"{fake.url}/v1"}
        procs.scheduler(**env)
        procs.worker(1, **env)
        # The API knows the deployment as the workers do (a base URL that needs no key).
        api = Api(settings, api_max_body_bytes=40 * MiB, api_max_request_bytes=8 * MiB,
                  openai_base_url=f"{fake.url}/v1").start()
        try:
            sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
            messages = [*CONVERSATION, {"role": "assistant", "content": "It is 4 degrees."},
                        {"role": "user", "content": [
                            {"type": "text", "text": "And on this photo? marker-77"},
                            {"type": "image_url",
                             "image_url": {"url": PIXEL, "detail": "high"}}]}]
            raw = sdk.chat.completions.with_raw_response.create(
                model="openai|gpt-test", messages=messages, tools=[TOOL], temperature=0)
        finally:
            api.stop()
        assert raw.http_response.status_code == 200
        [seen] = fake.requests_for("marker-77")
        assert seen.body["messages"] == sent(messages)
        assert seen.body["tools"] == [TOOL]  # the provider passed them on
        spec = stored(settings, raw.headers["x-promptbatch-job-id"])
        assert dumped(spec.tools) == [TOOL]


# --- OpenAI Batch API lines -----------------------------------------------------------------

def batch_line(custom_id: str, **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "echo|echo-1",
                                "messages": [{"role": "user", "content": "hi"}], **body}})


def test_batch_lines_with_bad_shapes_are_line_errors_naming_the_field(
        api: Api, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
    lines = {
        "schema": batch_line("schema", response_format=bad_schema()),
        "tool": batch_line("tool", tools=[bad_tool()]),
        "answer": batch_line("answer", messages=UNANSWERED),
        "n": batch_line("n", n=2),
        "stream": batch_line("stream", stream=True),
        "anthropic": batch_line("anthropic", model=ANTHROPIC, logprobs=True),
        "image": batch_line("image", model=ANTHROPIC, messages=user_with(image(5 * MiB + 1))),
    }
    wanted = {"schema": "body.response_format.json_schema.schema",
              "tool": "body.tools.0.function.name", "answer": "body.messages.1.tool_call_id",
              "n": "body.n", "stream": "body.stream", "anthropic": "body.logprobs",
              "image": "body.messages.0.content.1.image_url.url"}
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines.values()) + "\n", encoding="utf-8")
    file = sdk.files.create(file=src.open("rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = poll(lambda: (b := sdk.batches.retrieve(batch.id)).status == "completed" and b,
                timeout=30, interval=0.1, what="the batch to end")
    assert done.request_counts is not None and done.request_counts.failed == len(lines)
    assert done.error_file_id is not None
    errors = {e["custom_id"]: e["error"]["message"]
              for e in map(json.loads, sdk.files.content(done.error_file_id).text.splitlines())}
    for custom_id, field in wanted.items():
        assert f"{field}:" in errors[custom_id], errors[custom_id]
    assert nothing_enqueued(redis.Redis.from_url(api.settings.redis_url), api.settings)


def test_batch_lines_carry_every_shape_into_their_jobs(api: Api, settings: Settings,
                                                       tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
    body = {"messages": CONVERSATION + PARTS, "tools": [TOOL], "tool_choice": "required",
            "response_format": SCHEMA, "logprobs": True, "top_logprobs": 1,
            "max_completion_tokens": 30, "metadata": {"openai": "ignored"}, "user": "u"}
    src = tmp_path / "good.jsonl"
    src.write_text(batch_line("ok", **body) + "\n", encoding="utf-8")
    file = sdk.files.create(file=src.open("rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert batch.request_counts is not None and batch.request_counts.failed == 0
    store = JobStore(settings.database_url)
    try:
        [row] = store.list_jobs("tenant-a", limit=10)
    finally:
        store.close()
    spec = row.spec
    assert dumped(spec.messages) == sent(CONVERSATION + PARTS) and dumped(spec.tools) == [TOOL]
    assert dumped(spec.response_format) == SCHEMA and spec.tool_choice == "required"
    assert spec.params.logprobs is True and spec.params.max_tokens == 30
    assert spec.metadata["custom_id"] == "ok"


# --- promptbatch's own clients ----------------------------------------------------------------

def test_the_http_sdk_sends_our_types_and_a_pydantic_class_as_response_format(
        api: Api, settings: Settings) -> None:
    with pb_http.Client(api.url, KEY_A) as pb:
        job_id = pb.submit(messages=[Message.model_validate(m) for m in CONVERSATION],
                           tools=[Tool.model_validate(TOOL)], response_format=Person,
                           params={"temperature": 0})
        typed = pb.submit_many([JobRequest(messages=PARTS, response_format=ResponseFormat(
            **SCHEMA), tools=[TOOL], tool_choice="none")])
        with pytest.raises(pb_http.ApiError) as bad:
            pb.submit(prompt="x", tools=[bad_tool()])
    assert bad.value.status == 422 and bad.value.errors[0]["field"] == "tools.0.function.name"
    spec = stored(settings, job_id)
    assert dumped(spec.messages) == sent(CONVERSATION) and dumped(spec.tools) == [TOOL]
    assert spec.response_format is not None
    assert spec.response_format.answer_schema == Person.model_json_schema()
    other = stored(settings, typed[0])
    assert dumped(other.messages) == PARTS and dumped(other.response_format) == SCHEMA
    assert other.tool_choice == "none"


def test_the_python_client_takes_the_shapes_and_refuses_by_field(settings: Settings) -> None:
    with Client(settings) as client:
        job_id = client.submit(messages=CONVERSATION, tools=[TOOL], response_format=Person)
        spec = client.spec(job_id)
        assert dumped(spec.messages) == sent(CONVERSATION)
        assert spec.response_format is not None and spec.response_format.json_schema is not None
        assert spec.response_format.json_schema.name == "Person"
        with pytest.raises(InvalidJob) as bad:
            client.submit(messages=UNANSWERED)
        assert bad.value.fields == ["messages.1.tool_call_id"]
        with pytest.raises(InvalidJob) as unserved:
            client.submit("x", provider="anthropic", params={"frequency_penalty": 1})
        assert unserved.value.fields == ["params.frequency_penalty"]

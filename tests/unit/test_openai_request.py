"""An OpenAI request body as a job (``producers.openai_request``): the shapes pass, the
parameters map, what stays unserved is refused by name, and every error names the field
as the caller wrote it. Plain dictionaries, no HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from config.settings import Settings
from jobs.errors import InvalidJob
from jobs.validation import parse_request, resolve
from producers.openai_request import job_fields, openai_errors, openai_field
from tests.shapes import PERSON as SCHEMA

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42"
         "mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
CONVERSATION = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": [{"type": "text", "text": "Weather here?"},
                                 {"type": "image_url",
                                  "image_url": {"url": PIXEL, "detail": "low"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 4}"},
]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "echo|echo-1", "messages": [{"role": "user", "content": "hi"}], **fields}


def errors_of(body: dict[str, Any], *, chat_call: bool = True, batch: bool = False,
              provider: str = "echo") -> list[str]:
    """The fields an OpenAI body is refused for, as the caller sees them (the translation,
    then the job's own validation and its provider's capabilities)."""
    try:
        item = job_fields(body, chat=chat_call, ours=not batch, batch=batch)
        item["provider"] = provider
        resolve(parse_request(item), job_id="j", now=1.0, settings=SETTINGS)
    except InvalidJob as exc:
        return openai_errors(exc, body, "body." if batch else "").fields
    return []


def test_a_chat_body_with_every_shape_becomes_a_job_with_them_intact() -> None:
    body = chat(messages=CONVERSATION, tools=[TOOL], tool_choice="required",
                parallel_tool_calls=False, response_format=SCHEMA, logprobs=True,
                top_logprobs=3, max_completion_tokens=50, temperature=0, seed=7,
                user="u-1", store=False, n=1, modalities=["text"], logit_bias={})
    item = job_fields(body)
    assert item["messages"] == CONVERSATION and item["tools"] == [TOOL]
    assert item["response_format"] == SCHEMA and item["tool_choice"] == "required"
    assert item["parallel_tool_calls"] is False
    assert item["params"] == {"logprobs": True, "top_logprobs": 3, "max_tokens": 50,
                              "temperature": 0, "seed": 7}
    spec = resolve(parse_request({**item, "provider": "echo"}), job_id="j", now=1.0,
                   settings=SETTINGS)
    assert spec.tools is not None and spec.tools[0].function.name == "get_weather"
    assert spec.response_format is not None
    assert spec.response_format.answer_schema == SCHEMA["json_schema"]["schema"]  # type: ignore[index]
    assert spec.messages is not None and spec.messages[1].images[0].url == PIXEL
    assert spec.messages[2].tool_calls is not None and spec.messages[3].tool_call_id == "call_1"
    assert spec.params.logprobs is True and spec.params.top_logprobs == 3


def test_logprobs_false_is_the_default_and_our_own_fields_pass_on_chat_only() -> None:
    assert "logprobs" not in job_fields(chat(logprobs=False))["params"]
    assert job_fields(chat(priority="high", timeout_s=5))["priority"] == "high"
    assert errors_of(chat(priority="high"), batch=True) == ["body.priority"]
    assert "metadata" not in job_fields(chat(metadata={"k": "v"}), ours=False, batch=True)


@pytest.mark.parametrize(("body", "field"), [
    (chat(n=2), "n"),
    (chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (chat(modalities=["text", "audio"]), "modalities"),
    (chat(prediction={"type": "content", "content": "x"}), "prediction"),
    (chat(web_search_options={}), "web_search_options"),
    (chat(functions=[TOOL["function"]]), "functions"),
    (chat(function_call="auto"), "function_call"),
    (chat(logit_bias={"50256": -100}), "logit_bias"),
    (chat(reasoning_effort="low"), "reasoning_effort"),
    (chat(flavour="mint"), "flavour"),
    (chat(top_logprobs=2), "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "echo|echo-1"}, "messages"),
    (chat(tools=[{"type": "web_search"}]), "tools.0.type"),
    (chat(tools=[{**TOOL, "function": {**TOOL["function"], "name": "get weather"}}]),
     "tools.0.function.name"),
    (chat(tools=[{**TOOL, "function": {**TOOL["function"],
                                       "parameters": {"type": "objekt"}}}]),
     "tools.0.function.parameters"),
    (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": "name"}}}),
     "response_format.json_schema.schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "a name", "schema": {"type": "object"}}}), "response_format.json_schema.name"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    (chat(messages=[{"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_9", "content": "4"}]),
     "messages.1.tool_call_id"),
    (chat(messages=[{"role": "user", "content": [{"type": "input_audio",
                                                  "input_audio": {"data": "", "format": "wav"}}]}]),
     "messages.0.content.0.type"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]),
     "messages.0.content.0.image_url.url"),
    (chat(tool_choice={"type": "function", "function": {"name": "other"}}, tools=[TOOL]),
     "tool_choice.function.name"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(temperature=3), "temperature"),
    (chat(stop=[""]), "stop.0"),
])
def test_what_is_not_served_or_not_valid_is_refused_naming_the_callers_field(
        body: dict[str, Any], field: str) -> None:
    assert field in errors_of(body)


def test_a_provider_that_cannot_serve_a_field_refuses_it_by_the_callers_name() -> None:
    body = chat(logprobs=True, top_logprobs=2, seed=1, presence_penalty=0.5)
    assert errors_of(body, provider="anthropic") == [
        "logprobs", "top_logprobs", "seed", "presence_penalty"]
    assert errors_of(body, provider="openai") == []
    assert errors_of(body, provider="anthropic", batch=True) == [
        "body.logprobs", "body.top_logprobs", "body.seed", "body.presence_penalty"]


def test_text_completions_take_no_chat_shapes_and_no_integer_logprobs() -> None:
    body = {"model": "echo|echo-1", "prompt": "hi", "tools": [TOOL], "logprobs": 2}
    assert errors_of(body, chat_call=False) == ["tools", "logprobs"]
    assert job_fields({"model": "m", "prompt": "hi", "max_tokens": 5}, chat=False) == {
        "prompt": "hi", "params": {"max_tokens": 5}}


def test_batch_lines_are_not_streamed_and_name_fields_under_body() -> None:
    assert errors_of(chat(stream=True), batch=True) == ["body.stream"]
    assert errors_of(chat(n=3, temperature=9), batch=True) == ["body.n"]
    assert errors_of(chat(temperature=9), batch=True) == ["body.temperature"]


@pytest.mark.parametrize(("field", "body", "named"), [
    ("params.max_tokens", {"max_completion_tokens": 1}, "max_completion_tokens"),
    ("params.max_tokens", {"max_tokens": 1}, "max_tokens"),
    ("params.stop.0", {}, "stop.0"),
    ("params.logprobs", {}, "logprobs"),
    ("provider", {}, "model"),
    ("messages.1.tool_call_id", {}, "messages.1.tool_call_id"),
    ("(body)", {}, "(body)"),
])
def test_job_fields_map_back_to_the_names_the_caller_wrote(
        field: str, body: dict[str, Any], named: str) -> None:
    assert openai_field(field, body) == named
    assert openai_field(field, body, "body.") == (
        "body" if named == "(body)" else f"body.{named}")

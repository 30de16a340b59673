"""Structured outputs, tools and content parts through the client libraries people use,
against a real stack (the API in uvicorn, a scheduler and a worker as processes, a real
Redis-compatible server and SQLite file) with the ``simulated`` provider: the official
``openai`` SDK, ``instructor`` (JSON, TOOLS and MD_JSON modes) and ``langchain-openai``.

Each check is what the library's user looks at: the model instance ``.parse()`` or
``response_model`` returns, typed tool calls, the content of a Batch output line; and
the job's stored result (``parsed``) where the promise is kept.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import instructor
import openai
import pytest
from jsonschema import Draft202012Validator
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field, constr

from config.settings import Settings
from jobs.store import JobStore
from promptbatch.embedded import EmbeddedRedis
from tests.conftest import Procs
from tests.helpers import poll
from tests.integration.test_api import KEY_A, Api

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.xdist_group("client_libraries")]

MODEL = "simulated|sim-1"
DOC = "Ada Lovelace, born 1815 in London, wrote the first program for the Analytical Engine."


class Person(BaseModel):
    """A person named in a text."""

    name: str
    born: int = Field(ge=1000, le=2100)
    city: str | None = None
    topics: list[str] = Field(min_length=1, max_length=4)
    kind: Literal["scientist", "artist", "other"]


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"] = "celsius"


class Invoice(BaseModel):
    """An extraction with the patterns pydantic models carry (codes, dates, ids)."""

    number: str = Field(pattern=r"^[A-Z]{3}-\d{4}$")
    issued: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    contact: str = Field(pattern=r"^[\w.+-]+@[\w-]+\.[\w.-]+$")
    ref: constr(pattern=r"^[a-z]{2,4}_\d+$", min_length=8, max_length=10)  # type: ignore[valid-type]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One stack for the module: API, scheduler and worker on a fresh server and store."""
    root = tmp_path_factory.mktemp("clients")
    with EmbeddedRedis(root / "redis") as server:
        settings = Settings(redis_url=server.url, database_url=f"sqlite:///{root / 'jobs.db'}",
                            data_dir=root / "var", _env_file=None)
        store = JobStore(settings.database_url)
        store.migrate()
        store.close()
        (root / "logs").mkdir()
        procs = Procs(settings, root / "logs")
        api = Api(settings, max_pending_per_tenant=10_000).start()
        try:
            procs.scheduler()
            procs.worker(2, PROMPTBATCH_SIMULATED_TIME_SCALE="0")
            yield api
        finally:
            api.stop()
            procs.stop_all()


@pytest.fixture
def sdk(stack: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0)


def stored(stack: Api, completion_id: str) -> dict[str, Any]:
    """The job's result as ``GET /v1/jobs/{id}/result`` gives it."""
    job_id = completion_id.removeprefix("chatcmpl-")
    resp = stack.a.get(f"/v1/jobs/{job_id}/result", params={"wait": 5})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def valid(value: Any, schema: dict[str, Any]) -> bool:
    return Draft202012Validator(schema).is_valid(value)


# --- the openai SDK ------------------------------------------------------------------------

def test_create_with_json_schema_answers_json_that_validates(sdk: openai.OpenAI,
                                                             stack: Api) -> None:
    schema = Person.model_json_schema()
    chat = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": DOC}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    content = chat.choices[0].message.content
    assert content is not None and chat.choices[0].finish_reason == "stop"
    value = json.loads(content)
    assert valid(value, schema), value
    assert all(word in DOC for topic in value["topics"] for word in topic.split())
    result = stored(stack, chat.id)
    assert result["parsed"] == value and result["schema_retries"] == 0
    other = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Grace Hopper, Arlington."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema}})
    assert json.loads(other.choices[0].message.content or "") != value  # drawn per prompt


def test_parse_returns_the_model_instance(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.parse(model=MODEL, response_format=Person,
                                      messages=[{"role": "user", "content": DOC}])
    person = chat.choices[0].message.parsed
    assert isinstance(person, Person) and 1000 <= person.born <= 2100


@pytest.mark.parametrize("model", [MODEL, "echo|echo-1"])
def test_a_schema_with_patterns_is_answered_valid_at_the_first_answer(
        sdk: openai.OpenAI, stack: Api, model: str) -> None:
    messages = [{"role": "user", "content": "Invoice from Acme, due in March."}]
    chat = sdk.chat.completions.parse(model=model, response_format=Invoice,
                                      messages=messages)  # type: ignore[arg-type]
    invoice = chat.choices[0].message.parsed
    assert isinstance(invoice, Invoice) and 8 <= len(invoice.ref) <= 10
    assert stored(stack, chat.id)["schema_retries"] == 0
    client = instructor.from_openai(sdk, mode=instructor.Mode.JSON)
    again = client.chat.completions.create(model=model, response_model=Invoice,
                                           max_retries=0, messages=messages)  # type: ignore[arg-type]
    assert isinstance(again, Invoice)


def test_json_object_answers_a_json_object(sdk: openai.OpenAI, stack: Api) -> None:
    chat = sdk.chat.completions.create(
        model=MODEL, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me JSON about Paris."}])
    value = json.loads(chat.choices[0].message.content or "")
    assert isinstance(value, dict)
    assert stored(stack, chat.id)["parsed"] == value


def test_tools_with_tool_choice_required_give_typed_tool_calls(sdk: openai.OpenAI,
                                                              stack: Api) -> None:
    chat = sdk.chat.completions.create(
        model=MODEL, tools=[WEATHER_TOOL], tool_choice="required",
        messages=[{"role": "user", "content": "Weather in Oslo this week?"}])
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert isinstance(call, openai.types.chat.ChatCompletionMessageFunctionToolCall)
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert valid(args, WEATHER_TOOL["function"]["parameters"])
    result = stored(stack, chat.id)
    assert result["tool_calls"][0]["function"]["arguments"] == call.function.arguments
    assert result["finish_reason"] == "tool_calls"


def test_a_conversation_with_a_tool_result_gets_an_answer(sdk: openai.OpenAI) -> None:
    # echo: its answer shows what reached the provider.
    first = sdk.chat.completions.create(
        model="echo|echo-1", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    [call] = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"  # auto: the first tool
    second = sdk.chat.completions.create(
        model="echo|echo-1", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  first.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "4 C, rain"}])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    content = second.choices[0].message.content or ""
    assert f"assistant: get_weather({call.function.arguments})" in content
    assert "tool: 4 C, rain" in content


def test_content_parts_with_an_image_count_its_tokens(sdk: openai.OpenAI) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}",
                                                 "detail": "low"}}]
    chat = sdk.chat.completions.create(model=MODEL,
                                       messages=[{"role": "user", "content": parts}])
    assert "What is in this picture?" in (chat.choices[0].message.content or "")
    plain = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is in this picture?"}])
    assert chat.usage is not None and plain.usage is not None
    assert chat.usage.prompt_tokens - plain.usage.prompt_tokens >= 85  # a low-detail image


def test_logprobs_come_when_asked(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(model=MODEL, logprobs=True, top_logprobs=2,
                                       messages=[{"role": "user", "content": "Hello there"}])
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in logprobs.content)


def test_logprobs_come_in_a_stream_too(sdk: openai.OpenAI, stack: Api) -> None:
    messages = [{"role": "user", "content": "Hello over a stream"}]
    chunks = list(sdk.chat.completions.create(model=MODEL, logprobs=True, top_logprobs=2,
                                              stream=True, messages=messages))  # type: ignore[arg-type]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or ()]
    assert content and "".join(t.token for t in tokens) == content
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    assert [t.model_dump() for t in tokens] == stored(stack, chunks[0].id)["logprobs"]["content"]
    with sdk.chat.completions.stream(model=MODEL, logprobs=True, top_logprobs=2,
                                     messages=messages) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    logprobs = final.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == final.choices[0].message.content


def test_a_streamed_tool_call_comes_as_openai_streams_it(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(
        model=MODEL, tools=[WEATHER_TOOL], tool_choice="required",
        stream=True, messages=[{"role": "user", "content": "Weather in Lima?"}]))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks
              if c.choices and c.choices[0].delta.tool_calls]
    head, rest = deltas[0], deltas[1:]
    assert head.index == 0 and head.id and head.id.startswith("call_")
    assert head.function is not None and head.function.name == "get_weather"
    assert head.function.arguments == "" and len(rest) > 1
    arguments = "".join((d.function.arguments or "") for d in rest if d.function)
    assert valid(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_sdks_stream_helper_assembles_tool_calls_and_json(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Lima?"}],
            tools=[openai.pydantic_function_tool(GetWeather)],
            tool_choice="required") as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)
    with sdk.chat.completions.stream(model=MODEL, response_format=Person,
                                     messages=[{"role": "user", "content": DOC}]) as stream:
        events = [e.type for e in stream]
        person = stream.get_final_completion().choices[0].message.parsed
    assert isinstance(person, Person) and "content.delta" in events


def test_a_batch_file_with_response_format_gives_parseable_output_lines(
        sdk: openai.OpenAI, tmp_path: Path) -> None:
    schema = {"name": "person", "schema": Person.model_json_schema(), "strict": True}
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({
        "custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "response_format": {"type": "json_schema",
                                                     "json_schema": schema},
                 "messages": [{"role": "user", "content": f"{DOC} ({i})"}]}}) + "\n"
        for i in range(4)))
    source = sdk.files.create(file=path.open("rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = poll(lambda: (b := sdk.batches.retrieve(batch.id)).status == "completed" and b,
                timeout=60, interval=0.2, what="the batch to complete")
    assert done.output_file_id is not None
    lines = [json.loads(x) for x in sdk.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in lines] == [f"doc-{i}" for i in range(4)]
    for line in lines:
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        Person.model_validate_json(body["choices"][0]["message"]["content"])


# --- instructor ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [instructor.Mode.JSON, instructor.Mode.TOOLS,
                                  instructor.Mode.MD_JSON])
def test_instructor_returns_the_response_model(sdk: openai.OpenAI,
                                               mode: instructor.Mode) -> None:
    client = instructor.from_openai(sdk, mode=mode)
    person = client.chat.completions.create(
        model=MODEL, response_model=Person, max_retries=0,
        messages=[{"role": "user", "content": DOC}])
    assert isinstance(person, Person) and person.topics


# --- langchain-openai --------------------------------------------------------------------------

@pytest.fixture
def llm(stack: Api) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=f"{stack.url}/v1", api_key=KEY_A,
                      max_retries=0)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(llm: ChatOpenAI, method: str) -> None:
    person = llm.with_structured_output(Person, method=method).invoke(DOC)
    assert isinstance(person, Person)


def test_langchain_bind_tools_gives_tool_calls_on_the_message(llm: ChatOpenAI) -> None:
    message = llm.bind_tools([GetWeather]).invoke("Weather in Rome?")
    assert isinstance(message, AIMessage)
    [call] = message.tool_calls
    assert call["name"] == "GetWeather" and GetWeather.model_validate(call["args"])
    chunks = list(llm.bind_tools([GetWeather], tool_choice="GetWeather").stream("Rome?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert isinstance(merged, AIMessageChunk)
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "GetWeather"


def test_langchain_stream(llm: ChatOpenAI) -> None:
    chunks = list(llm.stream("Say something about tides."))
    text = "".join(str(c.content) for c in chunks)
    assert "tides" in text and len(chunks) > 2


def test_a_schema_that_is_not_valid_is_refused_at_the_field(stack: Api) -> None:
    resp = httpx.post(f"{stack.url}/v1/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {KEY_A}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                            "response_format": {"type": "json_schema", "json_schema": {
                                "name": "bad", "schema": {"type": "nonsense"}}}})
    assert resp.status_code == 422, resp.text
    assert "response_format.json_schema.schema" in resp.text

"""The OpenAI translation both ways, as tables of request and answer pairs written from
OpenAI's Chat Completions reference (no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter

from jobs.chat import ResponseFormat, Tool, ToolChoice
from jobs.models import GenerationParams, Message, Usage
from tests.shapes import IMAGE, PERSON, WEATHER
from workers.providers.base import ProviderRequest
from workers.providers.openai_translation import (
    ChatStream,
    finish_reason,
    from_openai,
    needs_chat,
    to_openai,
)

CALL = {"id": "call_abc123", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}


def request(*, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
            params: dict[str, Any] | None = None, **shape: Any) -> ProviderRequest:
    """A request as the worker builds it, from the JSON a client sent."""
    msgs = tuple(Message.model_validate(m) for m in messages) if messages else None
    return ProviderRequest(
        job_id="j1", model="gpt-test", params=GenerationParams.model_validate(params or {}),
        prompt=prompt, messages=msgs, deadline=None, text=prompt or "",
        response_format=(ResponseFormat.model_validate(shape["response_format"])
                         if "response_format" in shape else None),
        tools=(tuple(Tool.model_validate(t) for t in shape["tools"])
               if "tools" in shape else None),
        tool_choice=(TypeAdapter(ToolChoice).validate_python(shape["tool_choice"])
                     if "tool_choice" in shape else None),
        parallel_tool_calls=shape.get("parallel_tool_calls"))


# (the request, the body OpenAI is sent)
REQUESTS: list[tuple[str, ProviderRequest, dict[str, Any]]] = [
    ("a plain prompt and its parameters",
     request(prompt="Say hi", params={"temperature": 0, "max_tokens": 5, "seed": 7}),
     {"model": "gpt-test", "messages": [{"role": "user", "content": "Say hi"}],
      "temperature": 0.0, "max_tokens": 5, "seed": 7}),
    ("content parts: text and an image with its detail",
     request(messages=[{"role": "user", "content": [
         {"type": "text", "text": "What is in this image?"},
         {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}]}]),
     {"model": "gpt-test", "messages": [{"role": "user", "content": [
         {"type": "text", "text": "What is in this image?"},
         {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}]}]}),
    ("an assistant's tool call (content null) and the tool's result",
     request(messages=[{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": None, "tool_calls": [CALL]},
                       {"role": "tool", "tool_call_id": "call_abc123", "content": "18C"}],
             tools=[WEATHER]),
     {"model": "gpt-test", "messages": [
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "tool_calls": [CALL]},
         {"role": "tool", "tool_call_id": "call_abc123", "content": "18C"}],
      "tools": [WEATHER]}),
    ("a json_schema response format, with 'schema' by its JSON name",
     request(prompt="Who wrote Faust?", response_format=PERSON),
     {"model": "gpt-test", "messages": [{"role": "user", "content": "Who wrote Faust?"}],
      "response_format": PERSON}),
    ("json_object",
     request(prompt="JSON please", response_format={"type": "json_object"}),
     {"model": "gpt-test", "messages": [{"role": "user", "content": "JSON please"}],
      "response_format": {"type": "json_object"}}),
    ("tools, a named tool_choice, parallel_tool_calls false",
     request(prompt="Weather?", tools=[WEATHER], parallel_tool_calls=False,
             tool_choice={"type": "function", "function": {"name": "get_weather"}}),
     {"model": "gpt-test", "messages": [{"role": "user", "content": "Weather?"}],
      "tools": [WEATHER], "parallel_tool_calls": False,
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("tool_choice required",
     request(prompt="Weather?", tools=[WEATHER], tool_choice="required"),
     {"model": "gpt-test", "messages": [{"role": "user", "content": "Weather?"}],
      "tools": [WEATHER], "tool_choice": "required"}),
    ("tool_choice none without tools is left out (OpenAI refuses it alone)",
     request(prompt="Hi", tool_choice="none"),
     {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}),
    ("logprobs and top_logprobs",
     request(prompt="Hi", params={"logprobs": True, "top_logprobs": 2}),
     {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}],
      "logprobs": True, "top_logprobs": 2}),
]


@pytest.mark.parametrize(("req", "body"), [(r, b) for _, r, b in REQUESTS],
                         ids=[n for n, _, _ in REQUESTS])
def test_a_request_passes_through_in_openais_shape(req: ProviderRequest,
                                                   body: dict[str, Any]) -> None:
    assert to_openai(req) == body


def test_the_prompt_cache_key_is_sent_when_given() -> None:
    assert to_openai(request(prompt="x"), "pb-123")["prompt_cache_key"] == "pb-123"


@pytest.mark.parametrize(("req", "chat"), [
    (request(prompt="plain"), False),
    (request(prompt="plain", response_format={"type": "text"}), False),
    (request(prompt="plain", params={"temperature": 0.5, "stop": ["\n"]}), False),
    (request(messages=[{"role": "user", "content": "hi"}]), True),
    (request(prompt="x", response_format={"type": "json_object"}), True),
    (request(prompt="x", response_format=PERSON), True),
    (request(prompt="x", tools=[WEATHER]), True),
    (request(prompt="x", params={"logprobs": True}), True),
])
def test_only_plain_prompts_may_go_to_the_completions_endpoint(req: ProviderRequest,
                                                               chat: bool) -> None:
    assert needs_chat(req) is chat


USAGE = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
         "prompt_tokens_details": {"cached_tokens": 4}}
LOGPROBS = {"content": [{"token": "Hello", "logprob": -0.31, "bytes": [72, 101, 108, 108, 111],
                         "top_logprobs": [{"token": "Hello", "logprob": -0.31,
                                           "bytes": [72, 101, 108, 108, 111]}]}],
            "refusal": None}


def completion(message: dict[str, Any], reason: str | None = "stop",
               logprobs: Any = None) -> dict[str, Any]:
    """A chat.completion object as OpenAI's reference shows it."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "logprobs": logprobs, "finish_reason": reason}],
            "usage": USAGE}


# (the answer, the reply's fields; 'error' holds a phrase the error must contain)
ANSWERS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("content", completion({"content": "Hello there", "refusal": None}),
     {"text": "Hello there", "finish_reason": "stop", "tool_calls": None, "refusal": None}),
    ("tool calls with content null",
     completion({"content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
                "tool_calls"),
     {"text": None, "finish_reason": "tool_calls",
      "tool_calls": [CALL, {**CALL, "id": "call_2"}]}),
    ("tool calls beside an empty string content (llama.cpp)",
     completion({"content": "", "tool_calls": [CALL]}, "tool_calls"),
     {"text": None, "tool_calls": [CALL]}),
    ("arguments given as an object, and no id",
     completion({"content": None, "tool_calls": [
         {"type": "function", "function": {"name": "get_weather",
                                           "arguments": {"location": "Paris"}}}]},
                "tool_calls"),
     {"tool_calls": [{"id": "call_0", "type": "function", "function": {
         "name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]}),
    ("a refusal is a success that carries it",
     completion({"content": None, "refusal": "I'm sorry, I cannot help with that."}),
     {"text": None, "refusal": "I'm sorry, I cannot help with that.",
      "finish_reason": "stop", "error": None}),
    ("logprobs", completion({"content": "Hello"}, logprobs=LOGPROBS),
     {"text": "Hello", "logprobs": LOGPROBS}),
    ("length", completion({"content": "Hel"}, "length"), {"finish_reason": "length"}),
    ("an older server's function_call", completion({"content": "x"}, "function_call"),
     {"finish_reason": "tool_calls"}),
    ("an unknown finish reason", completion({"content": "x"}, "abort"),
     {"finish_reason": None}),
    ("no content, tool calls nor refusal", completion({"content": ""}),
     {"error": "empty answer (finish_reason 'stop')"}),
    ("a content filter withheld it", completion({"content": None}, "content_filter"),
     {"error": "content filter"}),
    ("empty choices", {"choices": [], "usage": USAGE}, {"error": "empty choices"}),
    ("no message", {"choices": [{"index": 0}]}, {"error": "malformed response"}),
    ("a tool call that is not a function",
     completion({"content": None, "tool_calls": [{"id": "c", "type": "custom"}]}),
     {"error": "not a function call"}),
    ("a tool call without a name",
     completion({"content": None, "tool_calls": [{"id": "c", "function": {}}]}),
     {"error": "tool_calls[0]"}),
    ("content that is not a string", completion({"content": ["a"]}),
     {"error": "content is a list"}),
]

#: Answers of other OpenAI-compatible servers, outside OpenAI's own types.
OTHER_SERVERS = {"arguments given as an object, and no id", "an unknown finish reason"}


@pytest.mark.parametrize(("data", "want"), [(d, w) for _, d, w in ANSWERS],
                         ids=[n for n, _, _ in ANSWERS])
def test_an_answer_comes_back_as_the_message_the_server_gave(data: dict[str, Any],
                                                             want: dict[str, Any]) -> None:
    reply = from_openai("j1", data, "RAW")
    if want.get("error"):
        assert reply.error is not None and want["error"] in reply.error, reply.error
        assert "RAW" in reply.error and not reply.transient
        return
    assert reply.error is None, reply.error
    calls = [c.model_dump() for c in reply.tool_calls] if reply.tool_calls else None
    got = {"text": reply.text, "finish_reason": reply.finish_reason, "tool_calls": calls,
           "refusal": reply.refusal, "logprobs": reply.logprobs, "error": reply.error}
    assert {k: got[k] for k in want} == want
    assert reply.usage == Usage(prompt_tokens=19, completion_tokens=10, cached_tokens=4)


def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-test",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, **extra}]}


USAGE_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "gpt-test", "choices": [], "usage": USAGE}
# Two parallel calls, their arguments in fragments, as OpenAI's streaming guide shows.
TOOL_STREAM = [
    chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"locat"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "ion\":\"Paris\"}"}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{\"location\":\"Oslo\"}"}}]}),
    chunk({}, "tool_calls"),
    USAGE_CHUNK,
]


def fold(chunks: list[dict[str, Any]]) -> tuple[ChatStream, list[str]]:
    stream = ChatStream()
    forwarded = [stream.add(c) for c in chunks]
    return stream, [f for f in forwarded if f]


def test_a_streamed_answer_forwards_content_and_folds_into_one_reply() -> None:
    stream, sent = fold([chunk({"role": "assistant", "content": ""}),
                         chunk({"content": "Hel"}, logprobs={"content": [{"token": "Hel"}]}),
                         chunk({"content": "lo"}, logprobs={"content": [{"token": "lo"}]}),
                         chunk({}, "stop"), USAGE_CHUNK])
    assert sent == ["Hel", "lo"]
    reply = stream.reply("j1")
    assert (reply.text, reply.finish_reason, reply.tool_calls) == ("Hello", "stop", None)
    assert reply.logprobs == {"content": [{"token": "Hel"}, {"token": "lo"}]}
    assert reply.usage is not None and reply.usage.cached_tokens == 4


def test_streamed_tool_call_deltas_accumulate_by_index() -> None:
    stream, sent = fold(TOOL_STREAM)
    assert sent == []
    reply = stream.reply("j1")
    assert reply.error is None and reply.text is None
    assert reply.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls or ()] == [
        ("call_a", "get_weather", "{\"location\":\"Paris\"}"),
        ("call_b", "get_weather", "{\"location\":\"Oslo\"}")]


def test_a_streamed_refusal_is_kept_and_an_empty_stream_is_an_error() -> None:
    stream, _ = fold([chunk({"refusal": "I'm sorry"}), chunk({"refusal": ", no."}),
                      chunk({}, "stop")])
    reply = stream.reply("j1")
    assert (reply.error, reply.refusal, reply.text) == (None, "I'm sorry, no.", None)
    empty, _ = fold([chunk({"role": "assistant"}), chunk({}, "stop")])
    bad = empty.reply("j1")
    assert bad.error is not None and "empty answer (no content streamed)" in bad.error


@pytest.mark.parametrize(("raw", "want"), [("stop", "stop"), ("tool_calls", "tool_calls"),
                                           ("eos", "stop"), (None, None), (3, None)])
def test_finish_reasons_in_openais_terms(raw: Any, want: str | None) -> None:
    assert finish_reason(raw) == want


def _consume(value: Any) -> Any:
    """A validated value with its lazily validated iterables walked (pydantic checks an
    ``Iterable`` field's items only as they are read)."""
    if isinstance(value, dict):
        return {k: _consume(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or hasattr(value, "__next__"):
        return [_consume(v) for v in value]
    return value


def test_the_tables_are_in_the_openai_sdks_own_types() -> None:
    """Every request body the translation makes is a ``CompletionCreateParams`` of the
    official SDK, every answer of the tables a ``ChatCompletion``, every chunk a
    ``ChatCompletionChunk``: the tables speak OpenAI's API, not a guess of it."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.chat.completion_create_params import (
        CompletionCreateParamsNonStreaming,
    )

    params = TypeAdapter(CompletionCreateParamsNonStreaming)
    for _, req, _ in REQUESTS:
        body = to_openai(req, "pb-key")
        assert _consume(params.validate_python(body)) == body
    for name, data, want in ANSWERS:
        if not want.get("error") and name not in OTHER_SERVERS:
            ChatCompletion.model_validate(data)
    for c in TOOL_STREAM:
        ChatCompletionChunk.model_validate(c)

"""Answers in OpenAI's exact shape (``producers.openai_answer``), checked with the official
SDK's own types and its stream accumulator: pure, no server."""

from __future__ import annotations

import json

from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from jobs.chat import FunctionCall, ToolCall
from jobs.models import JobResult, JobState, Usage
from producers.openai_answer import ChunkStream, TextChunkStream, completion
from producers.openai_batch import output_line
from promptbatch.bulk import output_row


class City(BaseModel):
    city: str
    days: int


ARGS = '{"city": "Oslo \\"north\\"", "days": [1, {"x": null}]}'
CALLS = [ToolCall(id="call_abc", function=FunctionCall(name="get_weather", arguments=ARGS)),
         ToolCall(id="call_def", function=FunctionCall(name="clock", arguments="{}"))]
LOGPROBS = {"content": [{"token": "{}", "logprob": -0.1, "bytes": [123, 125],
                         "top_logprobs": []}], "refusal": None}


def result(**kw: object) -> JobResult:
    base: dict[str, object] = {"id": "job-1", "state": JobState.SUCCEEDED, "created_at": 1.0,
                               "usage": Usage(prompt_tokens=10, completion_tokens=5,
                                              cached_tokens=4)}
    return JobResult.model_validate({**base, **kw})


def test_a_tool_call_answer_is_a_typed_chat_completion() -> None:
    body = completion(result(tool_calls=CALLS, finish_reason="tool_calls"), "m")
    parsed = ChatCompletion.model_validate(body)
    message = parsed.choices[0].message
    assert message.content is None and parsed.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in message.tool_calls or []] == ["get_weather", "clock"]
    assert parsed.usage is not None and parsed.usage.total_tokens == 15
    text = ChatCompletion.model_validate(completion(result(text="hi", logprobs=LOGPROBS), "m"))
    assert text.choices[0].message.content == "hi" and text.choices[0].finish_reason == "stop"
    assert text.choices[0].logprobs is not None
    refused = completion(result(refusal="I can't."), "m")
    assert refused["choices"][0]["message"]["content"] is None
    assert refused["choices"][0]["message"]["refusal"] == "I can't."


def test_tool_calls_stream_as_openai_streams_them() -> None:
    stream = ChunkStream("job-1", "m", 1)
    res = result(tool_calls=CALLS, finish_reason="tool_calls")
    chunks = [stream.start(), *stream.rest(res, content=True), stream.usage(res)]
    typed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    deltas = [c.choices[0].delta.tool_calls[0] for c in typed
              if c.choices and c.choices[0].delta.tool_calls]
    firsts = [d for d in deltas if d.id]
    assert [(d.index, d.id, d.function.name if d.function else None,
             d.function.arguments if d.function else None) for d in firsts] == [
        (0, "call_abc", "get_weather", ""), (1, "call_def", "clock", "")]
    pieces = [d.function.arguments for d in deltas if not d.id and d.index == 0 and d.function]
    assert len(pieces) > 5 and "".join(p or "" for p in pieces) == ARGS
    assert typed[-2].choices[0].finish_reason == "tool_calls"
    assert typed[-1].choices == [] and typed[-1].usage is not None
    state = ChatCompletionStreamState()  # the SDK's own accumulator
    for c in typed:
        state.handle_chunk(c)
    final = state.get_final_completion().choices[0].message
    assert [(c.id, c.function.arguments) for c in final.tool_calls or []] == [
        ("call_abc", ARGS), ("call_def", "{}")]


def test_json_content_streams_and_parses_with_the_sdks_helper() -> None:
    content = '{"city": "Oslo", "days": 3}'
    stream = ChunkStream("job-1", "m", 1)
    res = result(text=content, parsed=json.loads(content))
    chunks = [stream.start(), stream.content(content[:10]), stream.content(content[10:]),
              *stream.rest(res, content=False)]
    state = ChatCompletionStreamState(response_format=City)
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    assert state.get_final_completion().choices[0].message.parsed == City(city="Oslo", days=3)


def test_a_legacy_completion_stream_keeps_its_shape() -> None:
    stream = TextChunkStream("job-1", "m", 1)
    chunks = [stream.start(), *stream.rest(result(text="done"), content=True)]
    assert [c["choices"][0]["text"] for c in chunks] == ["", "done", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[0]["object"] == "text_completion"


def test_batch_lines_and_run_lines_carry_the_answer() -> None:
    res = result(text='{"a": 1}', parsed={"a": 1}, finish_reason="stop", model="sim-1",
                 schema_retries=0)
    line = output_line("doc-1", res)
    body = ChatCompletion.model_validate(line["response"]["body"])
    assert body.choices[0].message.content == '{"a": 1}' and body.model == "sim-1"
    row = output_row(3, "doc-1", "job-1", result(tool_calls=CALLS))
    assert row["tool_calls"][0]["function"]["arguments"] == ARGS
    assert {"refusal", "finish_reason", "logprobs", "parsed", "error_code"} <= row.keys()
    failed = output_row(4, None, "job-2", result(state=JobState.FAILED, text="oops",
                                                 error_code="invalid_output"))
    assert failed["text"] == "oops" and failed["error_code"] == "invalid_output"
    rejected = output_row(5, None, None, None, "bad line")
    assert rejected.keys() == row.keys()

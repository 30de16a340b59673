"""The schema promise's check (``jobs.answers``): pure, a table of answers and what each
gets, and the conversation that asks again."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.answers import check_answer, needs_check, reask
from jobs.chat import FunctionCall, Message, ResponseFormat, Tool, ToolCall

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "born": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "format": "email"},
    "when": {"type": "string", "format": "date"}},
    "required": ["name", "born"], "additionalProperties": False}
SCHEMA = ResponseFormat.model_validate(
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
OBJECT = ResponseFormat(type="json_object")
WEATHER = Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
CLOCK = Tool.model_validate({"type": "function", "function": {"name": "clock"}})


def call(name: str, arguments: str, id: str = "call_1") -> ToolCall:
    return ToolCall(id=id, function=FunctionCall(name=name, arguments=arguments))


@pytest.mark.parametrize(("text", "fmt", "parsed", "problem"), [
    ('{"name": "Ada", "born": 1815}', SCHEMA, {"name": "Ada", "born": 1815}, None),
    ('{"name": "Ada"}', SCHEMA, None, "content at $: 'born' is a required property"),
    ('{"name": "Ada", "born": -1}', SCHEMA, None,
     "content at $.born: -1 is less than the minimum of 0"),
    ('{"name": "Ada", "born": 1, "x": 1}', SCHEMA, None,
     "content at $: Additional properties are not allowed ('x' was unexpected)"),
    ('{"name": "Ada", "born": 1, "email": "nobody"}', SCHEMA, None,
     "content at $.email: 'nobody' is not a 'email'"),
    ('{"name": "Ada", "born": 1, "when": "1815-13-40"}', SCHEMA, None,
     "content at $.when: '1815-13-40' is not a 'date'"),
    ('```json\n{"name": "Ada", "born": 1}\n```', SCHEMA, None, "content at $: not JSON"),
    ("", SCHEMA, None, "content at $: no JSON: the answer is empty"),
    ('{"a": [1, 2]}', OBJECT, {"a": [1, 2]}, None),
    ("[1, 2]", OBJECT, None, "content at $: must be a JSON object, not list"),
    ("plain words", None, None, None),
])
def test_content_against_the_response_format(text: str, fmt: ResponseFormat | None,
                                              parsed: Any, problem: str | None) -> None:
    checked = check_answer(text, None, None, response_format=fmt, tools=None,
                           tool_choice=None)
    assert checked.parsed == parsed
    if problem is None:
        assert checked.ok
    else:
        assert checked.problem is not None and str(checked.problem).startswith(problem)


@pytest.mark.parametrize(("calls", "choice", "problem"), [
    ([call("get_weather", '{"city": "Oslo"}')], "required", None),
    ([call("get_weather", '{"town": "Oslo"}')], "auto",
     "tool_calls[0].function.arguments at $: 'city' is a required property"),
    ([call("get_weather", '{"city": "Oslo"}'), call("get_weather", "{oops", "call_2")],
     "auto", "tool_calls[1].function.arguments at $: not JSON"),
    ([call("get_weather", "[]")], None,
     "tool_calls[0].function.arguments at $: must be a JSON object, not list"),
    ([call("send_mail", "{}")], "auto",
     "tool_calls[0].function.name at $: 'send_mail' is not one of the tools"),
    ([call("clock", '{"anything": 1}')], "auto", None),  # no parameters: any object
    ([], "auto", None),
    ([], "required", "tool_calls at $: tool_choice asks for a tool call; the answer has none"),
    ([], {"type": "function", "function": {"name": "clock"}},
     "tool_calls at $: tool_choice asks for a call of 'clock'"),
    ([call("get_weather", '{"city": "Oslo"}')], {"type": "function", "function": {
        "name": "clock"}}, "tool_calls[0].function.name at $: tool_choice asks for 'clock'"),
    ([call("clock", "{}")], "none", "tool_calls at $: tool_choice 'none' allows no tool call"),
])
def test_tool_calls_against_their_tools(calls: list[ToolCall], choice: Any,
                                        problem: str | None) -> None:
    from jobs.models import JobRequest

    request = JobRequest.model_validate({"prompt": "x", "tools": [
        WEATHER.model_dump(), CLOCK.model_dump()], "tool_choice": choice})
    checked = check_answer(None if calls else "text", calls, None, response_format=None,
                           tools=request.tools, tool_choice=request.tool_choice)
    if problem is None:
        assert checked.ok, checked.problem
    else:
        assert checked.problem is not None and str(checked.problem).startswith(problem)


def test_a_refusal_and_a_tool_call_answer_are_not_held_to_the_content_schema() -> None:
    refused = check_answer(None, None, "I can't help with that.", response_format=SCHEMA,
                           tools=None, tool_choice=None)
    assert refused.ok and refused.parsed is None
    calls = check_answer(None, [call("get_weather", '{"city": "Oslo"}')], None,
                         response_format=SCHEMA, tools=[WEATHER], tool_choice=None)
    assert calls.ok and calls.parsed is None
    assert not needs_check(ResponseFormat(type="text"), None)
    assert needs_check(OBJECT, None) and needs_check(None, [WEATHER])


def test_asking_again_carries_the_answer_and_the_error() -> None:
    user = Message(role="user", content="Who is Ada?")
    problem = check_answer("nope", None, None, response_format=SCHEMA, tools=None,
                           tool_choice=None).problem
    assert problem is not None
    again = reask([user], None, "nope", None, problem)
    assert [m.role for m in again] == ["user", "assistant", "user"]
    assert again[1].content == "nope" and "not JSON" in again[2].text
    from_prompt = reask(None, "Who is Ada?", "nope", None, problem)
    assert from_prompt[0] == user
    bad = [call("get_weather", '{"city": "Oslo"}'), call("get_weather", "{}", "call_2")]
    tool_problem = check_answer(None, bad, None, response_format=None, tools=[WEATHER],
                                tool_choice=None).problem
    assert tool_problem is not None
    again = reask([user], None, None, bad, tool_problem)
    assert [m.role for m in again] == ["user", "assistant", "tool", "tool"]
    assert again[1].tool_calls == bad
    assert again[2].tool_call_id == "call_1" and "Not run" in again[2].text
    assert again[3].tool_call_id == "call_2" and "'city' is a required" in again[3].text


def test_a_schema_with_an_integer_past_64_bits_is_served() -> None:
    from jobs.models import JobRequest

    big = 2 ** 70
    request = JobRequest.model_validate({"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"enum": [big]}}}})
    fmt = request.response_format
    assert check_answer(str(big), None, None, response_format=fmt, tools=None,
                        tool_choice=None).parsed == big
    assert check_answer("1", None, None, response_format=fmt, tools=None,
                        tool_choice=None).problem is not None

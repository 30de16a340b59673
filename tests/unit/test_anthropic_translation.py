"""The Anthropic translation both ways, as tables of request and answer pairs written from
Anthropic's Messages API reference (tool use, images, stop reasons, streaming; no HTTP)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.test_openai_translation import CALL, IMAGE, PERSON, WEATHER, request
from workers.providers.anthropic_stream import MessageStream
from workers.providers.anthropic_translation import (
    TranslationError,
    answer_shape,
    from_anthropic,
    to_anthropic,
)

WEATHER_TOOL = {"name": "get_weather", "description": "Weather at a place",
                "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]
PERSON_SCHEMA = PERSON["json_schema"]["schema"]  # type: ignore[index]
ANSWER_WORDS = "Give your whole answer by calling this tool: its input is the answer."
ASK = {"role": "user", "content": "Weather in Paris?"}


def body(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "max_tokens": 1024, "messages": list(messages), **extra}


# (the request, the Messages API body)
REQUESTS: list[tuple[str, Any, dict[str, Any]]] = [
    ("a plain prompt", request(prompt="Say hi"),
     body({"role": "user", "content": "Say hi"})),
    ("system and developer messages become the system text; parameters",
     request(messages=[{"role": "system", "content": "Be brief."},
                       {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
                       {"role": "user", "content": "Hi"}],
             params={"temperature": 1.5, "top_p": 0.9, "max_tokens": 50, "stop": ["END"]}),
     {"model": "gpt-test", "max_tokens": 50, "system": "Be brief.\n\nNo lists.",
      "messages": [{"role": "user", "content": "Hi"}], "temperature": 1.0, "top_p": 0.9,
      "stop_sequences": ["END"]}),
    ("images: a data: URL as a base64 source, an https URL as a url source",
     request(messages=[{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": IMAGE, "detail": "high"}},
         {"type": "text", "text": "Compare these."},
         {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}]),
     body({"role": "user", "content": [
         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                      "data": "iVBORw0KGgo="}},
         {"type": "text", "text": "Compare these."},
         {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]})),
    ("tool calls as tool_use blocks; the results of one turn as one user turn, first",
     request(messages=[
         ASK,
         {"role": "assistant", "content": "Let me check.",
          "tool_calls": [CALL, {**CALL, "id": "call_b", "function": {
              "name": "get_weather", "arguments": "{\"location\":\"Oslo\"}"}}]},
         {"role": "tool", "tool_call_id": "call_abc123", "content": "18C"},
         {"role": "tool", "tool_call_id": "call_b",
          "content": [{"type": "text", "text": "9C"}]},
         {"role": "user", "content": "And tomorrow?"}], tools=[WEATHER]),
     body(ASK,
          {"role": "assistant", "content": [
              {"type": "text", "text": "Let me check."},
              {"type": "tool_use", "id": "call_abc123", "name": "get_weather",
               "input": {"location": "Paris"}},
              {"type": "tool_use", "id": "call_b", "name": "get_weather",
               "input": {"location": "Oslo"}}]},
          {"role": "user", "content": [
              {"type": "tool_result", "tool_use_id": "call_abc123", "content": "18C"},
              {"type": "tool_result", "tool_use_id": "call_b",
               "content": [{"type": "text", "text": "9C"}]},
              {"type": "text", "text": "And tomorrow?"}]},
          tools=[WEATHER_TOOL], tool_choice={"type": "auto"})),
    ("a conversation with tool calls but no tools declares them, callable by none",
     request(messages=[ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                       {"role": "tool", "tool_call_id": "call_abc123", "content": "18C"}]),
     body(ASK,
          {"role": "assistant", "content": [
              {"type": "tool_use", "id": "call_abc123", "name": "get_weather",
               "input": {"location": "Paris"}}]},
          {"role": "user", "content": [
              {"type": "tool_result", "tool_use_id": "call_abc123", "content": "18C"}]},
          tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
          tool_choice={"type": "none"})),
    ("tool_choice required is any; parallel_tool_calls false disables parallel use",
     request(prompt="Weather?", tools=[WEATHER], tool_choice="required",
             parallel_tool_calls=False),
     body({"role": "user", "content": "Weather?"}, tools=[WEATHER_TOOL],
          tool_choice={"type": "any", "disable_parallel_tool_use": True})),
    ("a named tool_choice is type tool",
     request(prompt="Weather?", tools=[WEATHER],
             tool_choice={"type": "function", "function": {"name": "get_weather"}}),
     body({"role": "user", "content": "Weather?"}, tools=[WEATHER_TOOL],
          tool_choice={"type": "tool", "name": "get_weather"})),
    ("tool_choice none",
     request(prompt="Weather?", tools=[WEATHER], tool_choice="none"),
     body({"role": "user", "content": "Weather?"}, tools=[WEATHER_TOOL],
          tool_choice={"type": "none"})),
    ("a tool without parameters takes an empty object",
     request(prompt="Now?", tools=[{"type": "function", "function": {"name": "now"}}]),
     body({"role": "user", "content": "Now?"},
          tools=[{"name": "now", "input_schema": {"type": "object", "properties": {}}}],
          tool_choice={"type": "auto"})),
    ("json_schema is a forced answer tool whose input_schema is the schema",
     request(prompt="Who wrote Faust?", response_format=PERSON),
     body({"role": "user", "content": "Who wrote Faust?"},
          tools=[{"name": "person", "description": ANSWER_WORDS,
                  "input_schema": PERSON_SCHEMA}],
          tool_choice={"type": "tool", "name": "person", "disable_parallel_tool_use": True})),
    ("json_object is a forced answer tool with an open object",
     request(prompt="JSON please", response_format={"type": "json_object"}),
     body({"role": "user", "content": "JSON please"},
          tools=[{"name": "json_answer", "description": ANSWER_WORDS,
                  "input_schema": {"type": "object", "additionalProperties": True}}],
          tool_choice={"type": "tool", "name": "json_answer",
                       "disable_parallel_tool_use": True})),
    ("a schema that is not an object is the value of one ($schema, $defs at the root)",
     request(prompt="Names?", response_format={"type": "json_schema", "json_schema": {
         "name": "names", "description": "The names found.",
         "schema": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                    "type": "array", "items": {"$ref": "#/$defs/n"},
                    "$defs": {"n": {"type": "string"}}}}}),
     body({"role": "user", "content": "Names?"},
          tools=[{"name": "names", "description": f"The names found. {ANSWER_WORDS}",
                  "input_schema": {"type": "object", "properties": {"value": {
                      "type": "array", "items": {"$ref": "#/$defs/n"}}},
                      "required": ["value"], "$defs": {"n": {"type": "string"}},
                      "$schema": "https://json-schema.org/draft/2020-12/schema"}}],
          tool_choice={"type": "tool", "name": "names", "disable_parallel_tool_use": True})),
    ("a JSON format beside tools: any tool, the answer tool among them",
     request(prompt="Weather as JSON?", tools=[WEATHER], response_format=PERSON),
     body({"role": "user", "content": "Weather as JSON?"},
          tools=[WEATHER_TOOL, {"name": "person", "description": ANSWER_WORDS,
                                "input_schema": PERSON_SCHEMA}],
          tool_choice={"type": "any"})),
]


@pytest.mark.parametrize(("req", "want"), [(r, b) for _, r, b in REQUESTS],
                         ids=[n for n, _, _ in REQUESTS])
def test_a_request_in_anthropics_terms(req: Any, want: dict[str, Any]) -> None:
    assert to_anthropic(req, 1024) == want


@pytest.mark.parametrize(("arguments", "words"), [
    ("{not json", "messages.1.tool_calls.0.function.arguments is not JSON"),
    ("[1, 2]", "messages.1.tool_calls.0.function.arguments is not a JSON object")])
def test_tool_call_arguments_that_are_no_object_are_refused_by_field(arguments: str,
                                                                    words: str) -> None:
    call = {**CALL, "function": {"name": "get_weather", "arguments": arguments}}
    req = request(messages=[ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": CALL["id"], "content": "x"}],
                  tools=[WEATHER])
    with pytest.raises(TranslationError, match=words.replace(".", r"\.")):
        to_anthropic(req, 1024)


def test_the_answer_tool_never_takes_a_callers_tool_name() -> None:
    clash = {"type": "function", "function": {"name": "person"}}
    shape = answer_shape(request(prompt="x", tools=[clash], response_format=PERSON))
    assert shape is not None and shape.name == "answer_person"


USAGE = {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100,
         "cache_creation_input_tokens": 5}


def message(content: list[dict[str, Any]], stop: str | None = "end_turn") -> dict[str, Any]:
    """A Message object as Anthropic's reference shows it."""
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test",
            "content": content, "stop_reason": stop, "stop_sequence": None, "usage": USAGE}


TOOL_USE = {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
            "input": {"location": "San Francisco, CA", "unit": "celsius"}}
PERSON_REQ = request(prompt="x", response_format=PERSON)
NAMES_REQ = request(prompt="x", response_format={"type": "json_schema", "json_schema": {
    "name": "names", "schema": {"type": "array", "items": {"type": "string"}}}})

# (the request, the answer, the reply's fields; 'error' holds a phrase of the error)
ANSWERS: list[tuple[str, Any, dict[str, Any], dict[str, Any]]] = [
    ("text", request(prompt="x"), message([{"type": "text", "text": "Hi "},
                                           {"type": "text", "text": "there"}]),
     {"text": "Hi there", "finish_reason": "stop", "tool_calls": None}),
    ("text and a tool_use block", request(prompt="x", tools=[WEATHER]),
     message([{"type": "text", "text": "I'll check the weather."}, TOOL_USE], "tool_use"),
     {"text": "I'll check the weather.", "finish_reason": "tool_calls", "tool_calls": [
         {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
             "name": "get_weather",
             "arguments": json.dumps({"location": "San Francisco, CA", "unit": "celsius"})}}]}),
    ("the answer tool's input is the JSON content", PERSON_REQ,
     message([{"type": "text", "text": "Here it is."},
              {"type": "tool_use", "id": "toolu_2", "name": "person",
               "input": {"name": "Goethe"}}], "tool_use"),
     {"text": "{\"name\":\"Goethe\"}", "finish_reason": "stop", "tool_calls": None}),
    ("a wrapped answer is unwrapped", NAMES_REQ,
     message([{"type": "tool_use", "id": "t", "name": "names",
               "input": {"value": ["Ann", "Bo"]}}], "tool_use"),
     {"text": "[\"Ann\",\"Bo\"]", "finish_reason": "stop"}),
    ("stop_sequence", request(prompt="x"), message([{"type": "text", "text": "a"}],
                                                   "stop_sequence"),
     {"finish_reason": "stop"}),
    ("max_tokens", request(prompt="x"), message([{"type": "text", "text": "a"}], "max_tokens"),
     {"finish_reason": "length"}),
    ("a refusal is a success that carries it, as content_filter", request(prompt="x"),
     message([{"type": "text", "text": "I can't help with that."}], "refusal"),
     {"text": None, "refusal": "I can't help with that.", "finish_reason": "content_filter",
      "error": None}),
    ("a refusal without text", request(prompt="x"), message([], "refusal"),
     {"refusal": "The model declined to answer (stop_reason refusal).", "error": None}),
    ("thinking blocks are not the answer", request(prompt="x"),
     message([{"type": "thinking", "thinking": "hmm", "signature": "s"},
              {"type": "text", "text": "42"}]),
     {"text": "42"}),
    ("no content", request(prompt="x"), message([]), {"error": "empty answer"}),
    ("no content list", request(prompt="x"), {"type": "message"},
     {"error": "malformed response"}),
]


@pytest.mark.parametrize(("req", "data", "want"), [(r, d, w) for _, r, d, w in ANSWERS],
                         ids=[n for n, *_ in ANSWERS])
def test_an_answer_in_openais_terms(req: Any, data: dict[str, Any],
                                    want: dict[str, Any]) -> None:
    reply = from_anthropic("j1", data, answer_shape(req), "RAW")
    if want.get("error"):
        assert reply.error is not None and want["error"] in reply.error, reply.error
        assert "RAW" in reply.error and not reply.transient
        return
    calls = [c.model_dump() for c in reply.tool_calls] if reply.tool_calls else None
    got = {"text": reply.text, "finish_reason": reply.finish_reason, "tool_calls": calls,
           "refusal": reply.refusal, "error": reply.error}
    assert {k: got[k] for k in want} == want
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.cached_tokens) == (125, 9, 100)


def events(blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]],
           stop: str) -> list[tuple[str, dict[str, Any]]]:
    """A stream's events as Anthropic's streaming reference shows them."""
    out = [("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "content": [], "usage": {"input_tokens": 20, "output_tokens": 1}}})]
    for i, (start, deltas) in enumerate(blocks):
        out.append(("content_block_start", {"type": "content_block_start", "index": i,
                                            "content_block": start}))
        out.extend(("content_block_delta", {"type": "content_block_delta", "index": i,
                                            "delta": d}) for d in deltas)
        out.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop},
                                  "usage": {"output_tokens": 30}}))
    out.append(("message_stop", {"type": "message_stop"}))
    return out


def text(t: str) -> dict[str, Any]:
    return {"type": "text_delta", "text": t}


def frag(t: str) -> dict[str, Any]:
    return {"type": "input_json_delta", "partial_json": t}


def stream(req: Any, evs: list[tuple[str, dict[str, Any]]]) -> tuple[Any, str]:
    s = MessageStream(shape=answer_shape(req))
    forwarded = "".join(s.add(e, d) for e, d in evs)
    return s.reply("j1"), forwarded


def test_streamed_tool_use_input_fragments_fold_into_tool_calls() -> None:
    reply, forwarded = stream(request(prompt="x", tools=[WEATHER]), events([
        ({"type": "text", "text": ""}, [text("Okay, "), text("checking.")]),
        ({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
         [frag(""), frag("{\"location\": \"San Fra"), frag("ncisco, CA\"}")]),
        ({"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}, []),
    ], "tool_use"))
    assert forwarded == "Okay, checking." == reply.text
    assert reply.finish_reason == "tool_calls"
    assert [(c.id, json.loads(c.function.arguments)) for c in reply.tool_calls] == [
        ("toolu_1", {"location": "San Francisco, CA"}), ("toolu_2", {})]
    assert reply.usage.prompt_tokens == 20 and reply.usage.completion_tokens == 30


def test_a_streamed_json_answer_reaches_the_job_stream_as_the_content() -> None:
    reply, forwarded = stream(PERSON_REQ, events([
        ({"type": "text", "text": ""}, [text("Sure.")]),
        ({"type": "tool_use", "id": "t", "name": "person", "input": {}},
         [frag("{\"name\""), frag(": \"Goethe\"}")])], "tool_use"))
    assert forwarded == "{\"name\": \"Goethe\"}" == reply.text
    assert (reply.finish_reason, reply.tool_calls) == ("stop", None)
    wrapped, sent = stream(NAMES_REQ, events([
        ({"type": "tool_use", "id": "t", "name": "names", "input": {}},
         [frag("{\"value\": [\"A"), frag("nn\"]}")])], "tool_use"))
    assert sent == "[\"Ann\"]" == wrapped.text


def test_text_beside_a_tool_call_of_a_json_request_reaches_the_stream_at_the_end() -> None:
    req = request(prompt="x", tools=[WEATHER], response_format=PERSON)
    evs = events([({"type": "text", "text": ""}, [text("Let me "), text("look.")]),
                  ({"type": "tool_use", "id": "t", "name": "get_weather", "input": {}},
                   [frag("{}")])], "tool_use")
    s = MessageStream(shape=answer_shape(req))
    forwarded = [s.add(e, d) for e, d in evs]
    assert [f for f in forwarded if f] == ["Let me look."] and forwarded[-1] == "Let me look."
    reply = s.reply("j1")
    assert reply.text == "Let me look." and reply.finish_reason == "tool_calls"


def test_a_stream_whose_tool_input_is_not_json_is_an_error() -> None:
    reply, _ = stream(request(prompt="x", tools=[WEATHER]), events([
        ({"type": "tool_use", "id": "t", "name": "get_weather", "input": {}},
         [frag("{\"loc")])], "max_tokens"))
    assert reply.error is not None and "not JSON" in reply.error


def test_a_streamed_error_event_raises() -> None:
    with pytest.raises(ValueError, match="overloaded"):
        MessageStream().add("error", {"type": "error", "error": {"type": "overloaded_error"}})

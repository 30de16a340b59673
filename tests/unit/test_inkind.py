"""``echo`` and ``simulated`` answer in kind (``workers.providers.inkind``): which tool is
called when, deterministic ids, JSON that validates, logprobs; and simulated's stated
token rule for images, tools and schemas."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jobs.answers import check_answer
from jobs.models import JobRequest, JobSpec
from workers.providers.base import ProviderRequest
from workers.providers.echo import EchoProvider
from workers.providers.inkind import answer
from workers.providers.simulated import CostModel, SimulatedProvider

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}
PERSON = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
PNG = "data:image/png;base64,iVBORw0KGgo="


def request(job_id: str = "j1", **fields: Any) -> ProviderRequest:
    fields.setdefault("messages", [{"role": "user", "content": "Weather in Oslo?"}])
    req = JobRequest.model_validate(fields)
    spec = JobSpec(id=job_id, tenant="t", priority=req.priority, created_at=0.0,
                   provider="echo", model="echo-1", params=req.params, prompt=req.prompt,
                   messages=req.messages, response_format=req.response_format,
                   tools=req.tools, tool_choice=req.tool_choice)
    return ProviderRequest.from_spec(spec)


def checks(req: ProviderRequest, text: str | None, calls: Any) -> bool:
    return check_answer(text, calls, None, response_format=req.response_format,
                        tools=req.tools, tool_choice=req.tool_choice).ok


@pytest.mark.parametrize(("choice", "called"), [
    (None, "get_weather"), ("auto", "get_weather"), ("required", "get_weather"),
    ({"type": "function", "function": {"name": "clock"}}, "clock"), ("none", None),
])
def test_which_tool_is_called(choice: Any, called: str | None) -> None:
    req = request(tools=[WEATHER, CLOCK], tool_choice=choice)
    said = answer(req, "plain")
    if called is None:
        assert said.tool_calls is None and said.text == "plain"
        assert said.finish_reason == "stop"
    else:
        assert said.tool_calls is not None and said.text is None
        assert [c.function.name for c in said.tool_calls] == [called]
        assert said.finish_reason == "tool_calls"
    assert checks(req, said.text, said.tool_calls)


def test_after_a_tool_result_auto_answers_in_text_and_required_calls_again() -> None:
    first = answer(request(tools=[WEATHER]), "plain")
    assert first.tool_calls is not None
    [call] = first.tool_calls
    turn = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None,
             "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "4 C"}]
    assert answer(request(tools=[WEATHER], messages=turn), "plain").text == "plain"
    again = answer(request(tools=[WEATHER], tool_choice="required", messages=turn), "plain")
    assert again.tool_calls is not None


def test_ids_and_arguments_are_deterministic_and_valid() -> None:
    a = answer(request("j1", tools=[WEATHER]), "x").tool_calls
    b = answer(request("j2", tools=[WEATHER]), "x").tool_calls
    other = answer(request(tools=[WEATHER], messages=[
        {"role": "user", "content": "Rain in Lima tomorrow?"}]), "x").tool_calls
    assert a is not None and b is not None and other is not None
    assert a == b and a[0].id.startswith("call_") and len(a[0].id) == 29
    assert other[0].id != a[0].id and other[0].function.arguments != a[0].function.arguments
    args = json.loads(a[0].function.arguments)
    assert 1 <= args["days"] <= 7 and all(w in "Weather in Oslo?" for w in args["city"].split())


def test_json_formats_answer_json() -> None:
    req = request(response_format=PERSON)
    said = answer(req, "plain")
    assert said.finish_reason == "stop" and checks(req, said.text, None)
    assert json.loads(said.text or "")["name"]
    obj = request(response_format={"type": "json_object"})
    assert json.loads(answer(obj, "plain").text or "") == {"answer": "plain"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    told = request(response_format={"type": "json_object"}, messages=[
        {"role": "system", "content": f"Answer with JSON matching {json.dumps(schema)}."},
        {"role": "user", "content": "Count."}])
    assert set(json.loads(answer(told, "plain").text or "")) == {"n"}  # instructor's JSON mode


def test_logprobs_when_asked() -> None:
    plain = answer(request(), "Four words right here")
    assert plain.logprobs is None
    said = answer(request(params={"logprobs": True, "top_logprobs": 2}),
                  "Four words right here")
    assert said.logprobs is not None and said.logprobs["refusal"] is None
    entries = said.logprobs["content"]
    assert "".join(e["token"] for e in entries) == "Four words right here"
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["bytes"] == list(e["token"].encode()) for e in entries)


def test_echo_never_cuts_json_and_marks_a_cut_answer() -> None:
    echo = EchoProvider()
    [cut, shaped] = echo.complete([request("a", params={"max_tokens": 2}),
                                   request("b", params={"max_tokens": 2},
                                           response_format=PERSON)])
    assert cut.finish_reason == "length" and cut.text == "echo: us"
    assert shaped.text is not None and json.loads(shaped.text)["name"]


def test_simulated_counts_images_tools_and_schemas_by_its_rule() -> None:
    sim = SimulatedProvider(CostModel(time_scale=0, cache_tokens=0))
    text_only = request()
    low = request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Weather in Oslo?"},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]}])
    tools = request(tools=[WEATHER])
    _, [u_text, u_low, u_tools] = sim.cost([text_only, low, tools])
    assert u_low.prompt_tokens - u_text.prompt_tokens == 85 + len(" [image]") // 4
    tool_chars = len(json.dumps(WEATHER, separators=(",", ":")))
    assert u_tools.prompt_tokens - u_text.prompt_tokens == pytest.approx(tool_chars / 4, abs=1)
    [reply] = sim.complete([tools])
    assert reply.tool_calls is not None and reply.usage is not None
    call = reply.tool_calls[0].function
    assert reply.usage.completion_tokens == len(call.name + call.arguments) // 4 + 1


def test_echo_and_simulated_count_a_requests_tokens_alike() -> None:
    """One stated rule for both stub providers: two images of a prompt of a few words are
    counted by their detail (765 each, auto), tools and a schema by their JSON."""
    two = request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Which is bigger?"},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": {"url": PNG}}]}])
    cases = [request(), two, request(tools=[WEATHER, CLOCK]),
             request(response_format=PERSON), request(prompt="plain text", messages=None)]
    _, simulated = SimulatedProvider(CostModel(time_scale=0, cache_tokens=0)).cost(cases)
    echoed = EchoProvider().complete(cases)
    assert [r.usage.prompt_tokens for r in echoed if r.usage] == \
        [u.prompt_tokens for u in simulated]
    assert echoed[1].usage is not None and echoed[1].usage.prompt_tokens >= 2 * 765
    assert echoed[2].usage is not None and echoed[0].usage is not None
    assert echoed[2].usage.prompt_tokens - echoed[0].usage.prompt_tokens == pytest.approx(
        len(json.dumps([WEATHER, CLOCK], separators=(",", ":"))) / 4, abs=2)


#: What instructor's MD_JSON mode sends (instructor 1.17, its OpenAI handler): the schema
#: in the system message, the ask for a fenced block merged into the user's message.
MD_SYSTEM = ("As a genius expert, your task is to understand the content and provide\n"
             "the parsed objects in json that match the following json_schema:\n\n\n"
             + json.dumps(PERSON["json_schema"]["schema"], indent=2)
             + "\n\nMake sure to return an instance of the JSON, not the schema itself\n")
MD_ASK = "Return the correct JSON response within a ```json codeblock. not the JSON_SCHEMA"


def test_a_fenced_json_block_answers_instructors_md_json_ask_and_nothing_else() -> None:
    md = request(messages=[{"role": "system", "content": MD_SYSTEM},
                           {"role": "user", "content": f"Ada Lovelace, 1815\n\n{MD_ASK}"}])
    said = answer(md, "plain")
    assert said.text is not None and said.finish_reason == "stop"
    assert said.text.startswith("```json\n") and said.text.endswith("\n```")
    value = json.loads(said.text.removeprefix("```json\n").removesuffix("\n```"))
    assert checks(request(response_format=PERSON), json.dumps(value), None)
    assert "JSON_SCHEMA" not in said.text and "codeblock" not in said.text
    assert answer(md, "plain") == said  # deterministic
    # Without any of the three conditions, the plain answer as before.
    no_schema = request(messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": MD_ASK}])
    no_ask = request(messages=[{"role": "system", "content": MD_SYSTEM},
                               {"role": "user", "content": "Ada Lovelace, 1815"}])
    with_format = request(response_format={"type": "text"}, messages=[
        {"role": "system", "content": MD_SYSTEM}, {"role": "user", "content": MD_ASK}])
    for req in (no_schema, no_ask, with_format):
        assert answer(req, "plain").text == "plain"


def test_simulated_cuts_a_stated_share_of_its_json_answers() -> None:
    sim = SimulatedProvider(CostModel(time_scale=0, invalid_rate=0.3))
    reqs = [request(f"j{i}", response_format=PERSON, messages=[
        {"role": "user", "content": f"Person number {i}"}]) for i in range(400)]
    replies = sim.complete(reqs)
    bad = [r for q, r in zip(reqs, replies, strict=True) if not checks(q, r.text, None)]
    assert 0.2 < len(bad) / len(reqs) < 0.4
    assert [r.text for r in sim.complete(reqs)] == [r.text for r in replies]  # the same again
    calls = SimulatedProvider(CostModel(time_scale=0, invalid_rate=1.0)).complete(
        [request(tools=[WEATHER])])[0].tool_calls
    assert calls is not None and not checks(request(tools=[WEATHER]), None, calls)

"""Structured outputs, tools, tool results, images, refusals and logprobs through the
worker to real HTTP servers on loopback that speak OpenAI's and Anthropic's APIs.

Each test runs a real batch (``BatchRunner``) on a real Redis-compatible server and SQLite
file against ``tests.fake_llm``, and checks what the server received and the fields of
the job's result.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobRequest, JobResult, JobState
from jobs.queue import RedisQueue, connect
from jobs.store import JobStore
from jobs.streams import Sink, read, text_of
from jobs.validation import resolve
from producers.client import Client
from tests import fake_answers
from tests.fake_llm import FakeLLM, FakeServer
from tests.integration.test_providers import llm_settings
from tests.shapes import IMAGE, PERSON, WEATHER
from workers.batch import BatchRunner
from workers.providers import Provider, create_provider

pytestmark = pytest.mark.integration

CALL = {"id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"location\":\"Oslo\"}"}}
CONVERSATION = [
    {"role": "system", "content": "You answer about the weather."},
    {"role": "user", "content": [{"type": "text", "text": "Weather where this was taken?"},
                                 {"type": "image_url", "image_url": {"url": IMAGE}}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "9C and rain"},
    {"role": "user", "content": "And in Paris? (shapes-marker)"}]
SHAPE_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls")


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeServer() as state:
        yield state


def run_jobs(s: Settings, jobs: list[dict[str, Any]], r: redis.Redis | None = None,
             ) -> list[JobResult]:
    """Submit the jobs (their answer shapes on the resolved specs), run them as one batch
    in this process (streaming jobs write to a sink on ``r``), return their results."""
    providers: dict[str, Provider] = {}

    def provider_for(name: str) -> Provider:
        if name not in providers:
            providers[name] = create_provider(name, s)
            if r is not None:
                providers[name].sink = Sink(r, 60)
        return providers[name]

    now = time.time()
    specs = []
    for i, raw in enumerate(jobs):
        request = JobRequest.model_validate({"cache": "off", **raw})
        spec = resolve(request, job_id=str(uuid.uuid4()), now=now + i * 1e-6, settings=s)
        specs.append(spec.model_copy(update={k: getattr(request, k) for k in SHAPE_FIELDS}))
    with Client(s) as client:
        ids = client.submit_specs(specs)
        for spec in specs:
            client.r.set(keys.healthy(f"{spec.provider}|{spec.model}"), "1", ex=60)
        batch_id = str(uuid.uuid4())
        assert client.queue.acquire_lease("test-scheduler", 30)
        assert client.queue.claim("test-scheduler", batch_id, "{}",
                                  [(i, client.spec(i).tenant) for i in ids], time.time(), 2)
        runner = BatchRunner(s, RedisQueue(connect(s.redis_url)), JobStore(s.database_url),
                             provider_for)
        runner.run(batch_id, "send-1", ids)
        results = [client.result(i, timeout=5) for i in ids]
    for provider in providers.values():
        provider.close()
    return results


def openai_job(**kw: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": "gpt-test", **kw}


def anthropic_job(**kw: Any) -> dict[str, Any]:
    return {"provider": "anthropic", "model": "claude-test", **kw}


def calls(result: JobResult) -> list[tuple[str, str, dict[str, Any]]]:
    return [(c.id, c.function.name, json.loads(c.function.arguments))
            for c in result.tool_calls or ()]


# --- openai ------------------------------------------------------------------------------

def test_openai_passes_tools_through_and_a_tool_call_comes_back(settings: Settings,
                                                                fake: FakeLLM) -> None:
    fake.script("weather-q", ["tool_call"])
    [result] = run_jobs(llm_settings(settings, fake), [openai_job(
        prompt="weather-q: Paris?", tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False)])
    [seen] = fake.seen
    assert seen.path == "/v1/chat/completions"
    assert (seen.body["tools"], seen.body["tool_choice"], seen.body["parallel_tool_calls"]) \
        == ([WEATHER], "required", False)
    assert result.state is JobState.SUCCEEDED, result.error
    assert (result.text, result.finish_reason) == (None, "tool_calls")
    assert calls(result) == [("call_1", "get_weather", {"location": "Paris"})]


def test_openai_passes_a_conversation_with_images_and_tool_results_as_given(
        settings: Settings, fake: FakeLLM) -> None:
    [result] = run_jobs(llm_settings(settings, fake),
                        [openai_job(messages=CONVERSATION, tools=[WEATHER])])
    assert result.state is JobState.SUCCEEDED, result.error
    sent = fake.seen[0].body["messages"]
    assert sent[1]["content"][1] == {"type": "image_url",
                                     "image_url": {"url": IMAGE, "detail": "auto"}}
    assert sent[2] == {"role": "assistant", "tool_calls": [CALL]}
    assert sent[3] == {"role": "tool", "tool_call_id": "call_abc", "content": "9C and rain"}


def test_openai_passes_a_json_schema_and_keeps_the_json_answer(settings: Settings,
                                                               fake: FakeLLM) -> None:
    fake.script("who-wrote", ["json"])
    [result] = run_jobs(llm_settings(settings, fake), [openai_job(
        prompt="who-wrote Faust? Answer in JSON.", response_format=PERSON)])
    assert fake.seen[0].body["response_format"] == PERSON
    assert result.state is JobState.SUCCEEDED, result.error
    assert json.loads(result.text or "") == {"name": "Goethe"}
    assert result.finish_reason == "stop"


def test_an_openai_refusal_succeeds_with_the_refusal(settings: Settings,
                                                     fake: FakeLLM) -> None:
    fake.script("forbidden", ["refusal"])
    [result] = run_jobs(llm_settings(settings, fake), [openai_job(prompt="forbidden ask")])
    assert result.state is JobState.SUCCEEDED, result.error
    assert (result.text, result.refusal) == (None, fake_answers.REFUSAL)


def test_openai_logprobs_are_asked_for_and_kept(settings: Settings, fake: FakeLLM) -> None:
    [result] = run_jobs(llm_settings(settings, fake), [openai_job(
        prompt="hello", params={"logprobs": True, "top_logprobs": 1})])
    assert (fake.seen[0].body["logprobs"], fake.seen[0].body["top_logprobs"]) == (True, 1)
    assert result.state is JobState.SUCCEEDED, result.error
    assert result.logprobs == fake_answers.LOGPROBS


def test_a_batch_with_tools_never_goes_to_the_completions_endpoint(settings: Settings,
                                                                   fake: FakeLLM) -> None:
    s = llm_settings(settings, fake, openai_endpoint="completions")
    results = run_jobs(s, [openai_job(prompt=f"question {i}", tools=[WEATHER])
                           for i in range(3)])
    assert {r.state for r in results} == {JobState.SUCCEEDED}
    assert [x.path for x in fake.seen] == ["/v1/chat/completions"] * 3
    assert all(x.body["tools"] == [WEATHER] for x in fake.seen)
    plain = run_jobs(s, [openai_job(prompt=f"plain {i}") for i in range(3)])
    assert {r.state for r in plain} == {JobState.SUCCEEDED}
    assert fake.seen[-1].path == "/v1/completions" and len(fake.seen) == 4


def test_a_streamed_openai_tool_call_and_json_answer(settings: Settings, fake: FakeLLM,
                                                     r: redis.Redis) -> None:
    fake.script("stream-tool", ["tool_call"])
    fake.script("stream-json", ["json"])
    tool, answer = run_jobs(llm_settings(settings, fake), [
        openai_job(prompt="stream-tool Paris?", tools=[WEATHER], stream=True),
        openai_job(prompt="stream-json Faust?", response_format=PERSON, stream=True)], r)
    assert all(x.body["stream"] for x in fake.seen)
    assert tool.state is JobState.SUCCEEDED, tool.error
    assert (tool.text, tool.finish_reason) == (None, "tool_calls")
    assert calls(tool) == [("call_1", "get_weather", {"location": "Paris"})]
    assert answer.state is JobState.SUCCEEDED, answer.error
    assert json.loads(answer.text or "") == {"name": "Goethe"}
    assert text_of(read(r, answer.id, block_ms=10)) == answer.text


# --- anthropic ---------------------------------------------------------------------------

def test_anthropic_gets_tools_a_named_choice_images_and_tool_results_in_its_terms(
        settings: Settings, fake: FakeLLM) -> None:
    fake.script("shapes-marker", ["tool_call"])
    [result] = run_jobs(llm_settings(settings, fake), [anthropic_job(
        messages=CONVERSATION, tools=[WEATHER], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})])
    [seen] = fake.seen
    assert seen.path == "/v1/messages" and seen.action == "tool_call"  # not refused
    body = seen.body
    assert body["system"] == "You answer about the weather."
    assert body["tools"] == [{"name": "get_weather", "description": "Weather at a place",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather",
                                   "disable_parallel_tool_use": True}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert body["messages"][1]["content"] == [{"type": "tool_use", "id": "call_abc",
                                               "name": "get_weather",
                                               "input": {"location": "Oslo"}}]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_abc", "content": "9C and rain"},
        {"type": "text", "text": "And in Paris? (shapes-marker)"}]
    assert result.state is JobState.SUCCEEDED, result.error
    assert (result.text, result.finish_reason) == ("Checking.", "tool_calls")
    assert calls(result) == [("toolu_1", "get_weather", {"location": "Paris"})]


def test_empty_turns_of_a_conversation_are_left_out_for_anthropic(
        settings: Settings, fake: FakeLLM) -> None:
    """Turns that say nothing (an assistant's '', a user's empty text part), as chat
    histories hold them: Anthropic refuses a turn without content (400 'all messages must
    have non-empty content'), so the job failed; it is left out and the job answered."""
    [result] = run_jobs(llm_settings(settings, fake), [anthropic_job(messages=[
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Are you there?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": ""}]},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Good. (empty-turns)"}])])
    assert result.state is JobState.SUCCEEDED, result.error
    assert result.text == "anthropic says hi"
    [seen] = fake.seen
    assert seen.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello?"},
                                     {"type": "text", "text": "Are you there?"}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Good. (empty-turns)"}]


def test_anthropic_answers_a_json_schema_through_a_forced_tool(settings: Settings,
                                                               fake: FakeLLM) -> None:
    fake.script("who-wrote", ["json"])
    [result] = run_jobs(llm_settings(settings, fake), [anthropic_job(
        prompt="who-wrote Faust?", response_format=PERSON)])
    body = fake.seen[0].body
    assert body["tools"][0]["name"] == "person"
    assert body["tools"][0]["input_schema"] == PERSON["json_schema"]["schema"]  # type: ignore[index]
    assert body["tool_choice"] == {"type": "tool", "name": "person",
                                   "disable_parallel_tool_use": True}
    assert result.state is JobState.SUCCEEDED, result.error
    assert json.loads(result.text or "") == {"name": "Goethe"}
    assert (result.finish_reason, result.tool_calls) == ("stop", None)


def test_an_anthropic_refusal_succeeds_as_content_filter(settings: Settings,
                                                         fake: FakeLLM) -> None:
    fake.script("forbidden", ["refusal"])
    [result] = run_jobs(llm_settings(settings, fake), [anthropic_job(prompt="forbidden ask")])
    assert result.state is JobState.SUCCEEDED, result.error
    assert (result.text, result.refusal, result.finish_reason) == (
        None, fake_answers.REFUSAL, "content_filter")


def test_a_streamed_anthropic_tool_call_and_json_answer(settings: Settings, fake: FakeLLM,
                                                        r: redis.Redis) -> None:
    fake.script("stream-tool", ["tool_call"])
    fake.script("stream-json", ["json"])
    tool, answer = run_jobs(llm_settings(settings, fake), [
        anthropic_job(prompt="stream-tool Paris?", tools=[WEATHER], stream=True),
        anthropic_job(prompt="stream-json Faust?", response_format=PERSON, stream=True)], r)
    assert tool.state is JobState.SUCCEEDED, tool.error
    assert calls(tool) == [("toolu_1", "get_weather", {"location": "Paris"})]
    assert text_of(read(r, tool.id, block_ms=10)) == tool.text == "Checking."
    assert answer.state is JobState.SUCCEEDED, answer.error
    assert json.loads(answer.text or "") == {"name": "Goethe"}
    assert text_of(read(r, answer.id, block_ms=10)) == answer.text


def test_anthropic_marks_a_shared_lead_of_content_parts_for_caching(settings: Settings,
                                                                    fake: FakeLLM) -> None:
    shared = "Read this claim form and list what is missing from it. " * 5
    jobs = [anthropic_job(messages=[{"role": "user", "content": [
        {"type": "text", "text": f"{shared}claim {i}"},
        {"type": "image_url", "image_url": {"url": IMAGE}}]}]) for i in range(3)]
    results = run_jobs(llm_settings(settings, fake), jobs)
    assert {x.state for x in results} == {JobState.SUCCEEDED}
    for i, seen in enumerate(sorted(fake.seen, key=lambda x: json.dumps(x.body))):
        lead, rest, image = seen.body["messages"][0]["content"]
        assert lead == {"type": "text", "text": f"{shared}claim ",  # what all share
                        "cache_control": {"type": "ephemeral"}}
        assert rest == {"type": "text", "text": str(i)}
        assert image["type"] == "image"


def test_a_job_anthropic_cannot_take_fails_alone_before_sending(settings: Settings,
                                                                fake: FakeLLM) -> None:
    bad = {**CALL, "function": {"name": "get_weather", "arguments": "[\"Oslo\"]"}}
    conversation = [{"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [bad]},
                    {"role": "tool", "tool_call_id": "call_abc", "content": "9C"}]
    results = run_jobs(llm_settings(settings, fake), [
        anthropic_job(messages=conversation, tools=[WEATHER]),
        anthropic_job(prompt="fine")])
    assert results[0].state is JobState.FAILED and results[0].attempts == 1
    assert results[0].error is not None
    assert "messages.1.tool_calls.0.function.arguments is not a JSON object" in results[0].error
    assert results[1].state is JobState.SUCCEEDED
    assert len(fake.seen) == 1 and "fine" in fake.seen[0].text

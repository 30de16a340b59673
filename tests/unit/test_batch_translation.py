"""The providers' batch endpoints, both directions, with plain dictionaries written from
their references: a provider batch's request bodies are the live call's, its answers are
read as the live call reads them, and what a poll or a result line says."""

from __future__ import annotations

import json
from typing import Any

import pytest

from config.settings import Settings
from jobs.models import GenerationParams, Message
from workers.providers.anthropic import AnthropicProvider, from_anthropic
from workers.providers.anthropic_batch import bodies
from workers.providers.anthropic_batch import line_result as anthropic_line
from workers.providers.anthropic_batch import upstream as anthropic_upstream
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.batch_api import families
from workers.providers.http import cache_key
from workers.providers.openai import from_openai, to_openai
from workers.providers.openai_batch import input_file
from workers.providers.openai_batch import line_result as openai_line
from workers.providers.openai_batch import upstream as openai_upstream

SETTINGS = Settings(_env_file=None, anthropic_min_cache_tokens=20)  # type: ignore[call-arg]
SYSTEM_A = "You translate contracts into plain words for tenants. " * 6  # > 256 characters
SYSTEM_B = "You answer billing questions in two sentences at most. " * 6


def req(job_id: str, system: str, question: str, **params: Any) -> ProviderRequest:
    messages = (Message(role="system", content=system), Message(role="user", content=question))
    return ProviderRequest(job_id=job_id, model="m-1", params=GenerationParams(**params),
                           prompt=None, messages=messages, deadline=None,
                           text="\n".join(m.rendered() for m in messages))


REQUESTS = [req("b2", SYSTEM_B, "why twice?"), req("a1", SYSTEM_A, "clause 1"),
            req("b1", SYSTEM_B, "refund?", temperature=0.2), req("a2", SYSTEM_A, "clause 2")]


def test_an_openai_input_file_holds_the_live_bodies_a_family_at_a_time() -> None:
    lines = [json.loads(x) for x in input_file(REQUESTS).splitlines()]
    assert [x["custom_id"] for x in lines] == ["b1", "b2", "a1", "a2"]  # in families
    by_id = {x["custom_id"]: x for x in lines}
    assert {x["method"] for x in lines} == {"POST"}
    assert {x["url"] for x in lines} == {"/v1/chat/completions"}
    for family in families(REQUESTS):
        key = cache_key([r.text for r in family])
        assert key is not None
        for r in family:
            assert by_id[r.job_id]["body"] == to_openai(r, key)  # the live call's body
    assert by_id["b1"]["body"]["temperature"] == 0.2
    assert by_id["a1"]["body"]["prompt_cache_key"] != by_id["b1"]["body"]["prompt_cache_key"]
    assert "prompt_cache_key" not in json.loads(
        input_file(REQUESTS, prompt_cache_key=False).splitlines()[0])["body"]


ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 2,
              "prompt_tokens_details": {"cached_tokens": 16}}}


@pytest.mark.parametrize(("line", "again", "text", "error"), [
    ({"custom_id": "j", "response": {"status_code": 200, "body": ANSWER}, "error": None},
     False, "hi", None),
    ({"custom_id": "j", "response": {"status_code": 500, "body": {
        "error": {"message": "server trouble"}}}, "error": None}, True, None, None),
    ({"custom_id": "j", "response": {"status_code": 429, "body": {}}, "error": None},
     True, None, None),
    ({"custom_id": "j", "response": {"status_code": 400, "body": {
        "error": {"message": "max_tokens is too large"}}}, "error": None},
     False, None, "HTTP 400 (in the provider batch): max_tokens is too large"),
    ({"custom_id": "j", "response": None, "error": {"code": "batch_expired",
                                                    "message": "not run in time"}},
     True, None, None),
    ({"custom_id": "j", "response": None, "error": {"code": "cancelled",
                                                    "message": "CANCELLED"}},
     True, None, None),
    ({"custom_id": "j", "response": None, "error": {"code": "context_length_exceeded",
                                                    "message": "too long"}},
     False, None, "context_length_exceeded (in the provider batch): too long"),
    ({"custom_id": "j", "response": {"status_code": 200, "body": {"choices": []}},
     "error": None}, False, None, "no answer (empty choices)"),
])
def test_a_line_of_openai_batch_output(line: dict[str, Any], again: bool, text: str | None,
                                       error: str | None) -> None:
    got = openai_line(line)
    assert got.job_id == "j" and got.again is again
    if not again:
        assert got.reply is not None and got.reply.text == text
        assert (got.reply.error or "").startswith(error or "")
        assert (got.reply.error is None) is (error is None)


def test_an_openai_batch_answer_is_the_live_answer() -> None:
    got = openai_line({"custom_id": "j", "response": {"status_code": 200, "body": ANSWER}})
    live = from_openai("j", ANSWER, json.dumps(ANSWER))
    assert got.reply is not None and (got.reply.text, got.reply.usage) == (live.text,
                                                                           live.usage)
    assert got.reply.usage is not None and got.reply.usage.cached_tokens == 16


@pytest.mark.parametrize(("data", "ended", "failure"), [
    ({"id": "b", "status": "validating"}, False, None),
    ({"id": "b", "status": "in_progress", "request_counts": {"total": 3, "completed": 1,
                                                            "failed": 0}}, False, None),
    ({"id": "b", "status": "finalizing"}, False, None),
    ({"id": "b", "status": "cancelling"}, False, None),
    ({"id": "b", "status": "completed", "output_file_id": "f-out"}, True, None),
    ({"id": "b", "status": "expired"}, True, None),
    ({"id": "b", "status": "cancelled"}, True, None),
    ({"id": "b", "status": "failed", "errors": {"object": "list", "data": [
        {"code": "invalid_file", "message": "line 3 is not JSON"}]}}, True,
     "line 3 is not JSON"),
])
def test_what_an_openai_batch_object_says(data: dict[str, Any], ended: bool,
                                          failure: str | None) -> None:
    got = openai_upstream({**data, "metadata": {"promptbatch_batch": "ours"}})
    assert (got.ended, got.failure, got.ours) == (ended, failure, "ours")


def test_a_message_batch_holds_the_live_bodies_each_family_marked_for_the_cache() -> None:
    provider = AnthropicProvider(SETTINGS, api_key="k")
    entries = {e["custom_id"]: e["params"] for e in bodies(provider, REQUESTS)}
    assert set(entries) == {"a1", "a2", "b1", "b2"}
    for family in families(REQUESTS):
        live = provider.payloads(family)  # what the live call sends for the same group
        assert [entries[r.job_id] for r in family] == live
    for job_id, system in (("a1", SYSTEM_A), ("b2", SYSTEM_B)):
        assert entries[job_id]["system"] == [{"type": "text", "text": system,
                                              "cache_control": {"type": "ephemeral"}}]
    provider.close()


MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m-1",
           "content": [{"type": "text", "text": "plain words"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 90,
                     "cache_creation_input_tokens": 40}}


@pytest.mark.parametrize(("result", "again", "text", "error"), [
    ({"type": "succeeded", "message": MESSAGE}, False, "plain words", None),
    ({"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: too large"}}},
     False, None, "invalid_request_error (in the provider batch): max_tokens: too large"),
    ({"type": "errored", "error": {"type": "error", "error": {
        "type": "overloaded_error", "message": "busy"}}}, True, None, None),
    ({"type": "errored", "error": {"type": "api_error", "message": "oops"}}, True, None, None),
    ({"type": "canceled"}, True, None, None),
    ({"type": "expired"}, True, None, None),
])
def test_a_line_of_message_batch_results(result: dict[str, Any], again: bool,
                                         text: str | None, error: str | None) -> None:
    got = anthropic_line({"custom_id": "j", "result": result})
    assert got.job_id == "j" and got.again is again
    if not again:
        assert got.reply is not None and got.reply.text == text and got.reply.error == error


def test_a_message_batch_answer_is_the_live_answer_with_its_cache_tokens() -> None:
    got = anthropic_line({"custom_id": "j", "result": {"type": "succeeded",
                                                       "message": MESSAGE}})
    live: ProviderReply = from_anthropic("j", MESSAGE, None)
    assert got.reply is not None and got.reply.usage == live.usage
    usage = got.reply.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (142, 90, 40)


@pytest.mark.parametrize(("data", "ended", "total"), [
    ({"id": "m", "processing_status": "in_progress", "request_counts": {
        "processing": 3, "succeeded": 1, "errored": 0, "canceled": 0, "expired": 0}},
     False, 4),
    ({"id": "m", "processing_status": "canceling"}, False, 0),
    ({"id": "m", "processing_status": "ended", "results_url": "http://x/results",
      "created_at": "2026-12-06T10:00:00.5Z", "request_counts": {
          "processing": 0, "succeeded": 2, "errored": 1, "canceled": 1, "expired": 1}},
     True, 5),
])
def test_what_a_message_batch_object_says(data: dict[str, Any], ended: bool,
                                          total: int) -> None:
    got = anthropic_upstream(data)
    assert (got.ended, got.total) == (ended, total)
    if "created_at" in data:
        assert got.created_at == 1796551200.5 and got.output == "http://x/results"

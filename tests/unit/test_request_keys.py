"""Batching and caches stay right with the new request shapes: two jobs that differ only in
their response format or tools never share a batch or a cache entry, two that differ
only in an image never share a cache entry, the same ones do; images count for estimates
by their rule, never their bytes, and never enter a key. Pure: no Redis."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from config.settings import Settings
from jobs.cache import entry_json, hit_result, parse_entry
from jobs.cachekey import (
    cacheable,
    exact_key,
    request_body,
    semantic_partition,
    semantic_text,
)
from jobs.chat import IMAGE_TOKENS
from jobs.models import JobRequest, JobResult, JobSpec, JobState
from jobs.validation import resolve
from scheduler.embedders import HashedEmbedder
from scheduler.policy import Capacity, plan
from scheduler.pool import PendingJob, Pool, estimate_job_tokens, estimate_tokens, prefix_signature

SETTINGS = Settings(_env_file=None, redis_url="redis://x",  # type: ignore[call-arg]
                    cache_semantic_tenants=["acme"])
EMB = HashedEmbedder(dim=64)


def image(seed: bytes, size: int = 64) -> str:
    data = base64.b64encode(seed * (size // len(seed))).decode()
    return f"data:image/png;base64,{data}"


def tool(name: str = "get_weather", prop: str = "city") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {prop: {"type": "string"}}, "required": [prop]}}}


def schema(prop: str = "name") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {prop: {"type": "string"}}, "required": [prop]}}}


PIXEL_A, PIXEL_B = image(b"A"), image(b"B")
BASE: dict[str, Any] = {
    "messages": [{"role": "system", "content": "Extract the fields."},
                 {"role": "user", "content": [
                     {"type": "text", "text": "Who is on this badge?"},
                     {"type": "image_url", "image_url": {"url": PIXEL_A}}]}],
    "params": {"temperature": 0}, "tenant": "acme", "provider": "echo"}


def spec(job_id: str = "j1", **change: Any) -> JobSpec:
    return resolve(JobRequest(**{**BASE, **change}), job_id=job_id, now=1000.0,
                   settings=SETTINGS)


def with_image(url: str, detail: str = "auto") -> list[dict[str, Any]]:
    return [BASE["messages"][0], {"role": "user", "content": [
        {"type": "text", "text": "Who is on this badge?"},
        {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]


#: Changes that change the answer: each its own cache entry.
CHANGES: list[dict[str, Any]] = [
    {"response_format": schema()},
    {"response_format": {"type": "json_object"}},
    {"tools": [tool()]},
    {"tools": [tool()], "tool_choice": "required"},
    {"tools": [tool()], "parallel_tool_calls": False},
    {"params": {"temperature": 0, "logprobs": True}},
    {"params": {"temperature": 0, "logprobs": True, "top_logprobs": 3}},
    {"messages": with_image(PIXEL_B)},
    {"messages": with_image(PIXEL_A, "low")},
]


@pytest.mark.parametrize("change", CHANGES)
def test_whatever_changes_the_answer_changes_the_exact_key(change: dict[str, Any]) -> None:
    assert exact_key(spec(**change), SETTINGS) != exact_key(spec(), SETTINGS)


def test_the_same_shapes_share_a_key_and_different_ones_never_do() -> None:
    keys = {exact_key(spec(job_id=f"j{i}", **c), SETTINGS) for i, c in enumerate(CHANGES)}
    assert len(keys) == len(CHANGES)
    for change in CHANGES:
        assert exact_key(spec("x", **change), SETTINGS) == exact_key(spec("y", **change),
                                                                      SETTINGS)
    a = spec(response_format=schema("name"))
    b = spec(response_format=schema("title"))
    assert exact_key(a, SETTINGS) != exact_key(b, SETTINGS)
    assert exact_key(spec(tools=[tool(prop="city")]), SETTINGS) != exact_key(
        spec(tools=[tool(prop="town")]), SETTINGS)


def test_a_key_holds_an_image_by_its_digest_never_its_bytes() -> None:
    big = image(b"Z", 300_000)
    body = request_body(spec(messages=with_image(big)))
    assert big.split(",", 1)[1][:64] not in body and len(body) < 2_000
    digest = spec(messages=with_image(big)).messages[1].images[0].digest  # type: ignore[index]
    assert digest in body


def test_a_plain_requests_key_is_what_it_was_before_the_new_fields() -> None:
    plain = resolve(JobRequest(prompt="What is 2FA?", params={"temperature": 0}),
                    job_id="p", now=1.0, settings=SETTINGS)
    assert request_body(plain) == ('{"messages":[{"content":"What is 2FA?","role":"user"}],'
                                   '"params":{"temperature":0.0}}')


@pytest.mark.parametrize("change", CHANGES[:5])
def test_a_response_format_or_tools_split_batches(change: dict[str, Any]) -> None:
    assert spec(**change).compat_key != spec().compat_key
    assert spec("a", **change).compat_key == spec("b", **change).compat_key


def test_the_policy_never_puts_two_shapes_in_one_batch_and_batches_one_shape() -> None:
    specs = [spec(f"s{i}", response_format=schema()) for i in range(4)]
    specs += [spec(f"t{i}", tools=[tool()]) for i in range(4)]
    specs += [spec(f"i{i}", messages=with_image(image(bytes([65 + i])))) for i in range(4)]
    pool = Pool(dim=EMB.dim, horizons=(1.0, 2.0, 5.0, 30.0, 300.0), aging_s=600.0)
    texts = [s.text for s in specs]
    pool.add([PendingJob(id=s.id, key=s.compat_key, priority=2, tenant=s.tenant,
                         created_at=1000.0, deadline=None, tokens=estimate_job_tokens(s, t),
                         prefix=prefix_signature(t)) for s, t in zip(specs, texts, strict=True)],
             EMB.embed(texts))
    batches = plan(pool, 1000.0, SETTINGS, Capacity(slots=8)).batches
    groups = sorted(sorted(j.id for j in b.jobs) for b in batches)
    # Images do not shape the answer: jobs that differ only in theirs batch together.
    assert groups == [[f"i{i}" for i in range(4)], [f"s{i}" for i in range(4)],
                      [f"t{i}" for i in range(4)]]


def test_the_semantic_cache_serves_only_jobs_with_the_same_shapes_and_images() -> None:
    semantic = {"cache": "semantic"}
    base = semantic_partition(spec(**semantic), SETTINGS)
    for change in CHANGES[:5] + CHANGES[7:8]:
        assert semantic_partition(spec(**semantic, **change), SETTINGS) != base, change
        assert semantic_partition(spec("a", **semantic, **change), SETTINGS) == \
            semantic_partition(spec("b", **semantic, **change), SETTINGS)
    plain = resolve(JobRequest(prompt="hi", cache="semantic", tenant="acme"), job_id="p",
                    now=1.0, settings=SETTINGS)
    plain_tools = resolve(JobRequest(prompt="hi", cache="semantic", tenant="acme",
                                     tools=[tool()]), job_id="q", now=1.0, settings=SETTINGS)
    assert semantic_partition(plain, SETTINGS) != semantic_partition(plain_tools, SETTINGS)


def test_the_semantic_text_shows_tool_calls_for_the_guard() -> None:
    convo = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [{
                 "id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "4 degrees"}]
    text = semantic_text(spec(messages=convo, tools=[tool()]))
    assert text == 'Weather?\nget_weather({"city": "Oslo"})\n4 degrees'


def test_jobs_with_tools_or_a_schema_are_cached_like_any_deterministic_job() -> None:
    assert cacheable(spec(tools=[tool()]), SETTINGS)
    assert cacheable(spec(response_format=schema()), SETTINGS)
    assert not cacheable(spec(tools=[tool()], params={"temperature": 0.7}), SETTINGS)


def test_an_image_counts_by_its_rule_and_tools_as_text_never_by_bytes() -> None:
    small, big = spec(messages=with_image(image(b"s", 64))), spec(
        messages=with_image(image(b"b", 3_000_000)))
    assert estimate_job_tokens(small, small.text) == estimate_job_tokens(big, big.text)
    assert estimate_job_tokens(big, big.text) == estimate_tokens(big.text) + IMAGE_TOKENS["auto"]
    low = spec(messages=with_image(PIXEL_A, "low"))
    assert estimate_job_tokens(low, low.text) == estimate_tokens(low.text) + IMAGE_TOKENS["low"]
    plain = resolve(JobRequest(prompt="x" * 400), job_id="p", now=1.0, settings=SETTINGS)
    tooled = resolve(JobRequest(prompt="x" * 400, tools=[tool()] * 1), job_id="q", now=1.0,
                     settings=SETTINGS)
    assert estimate_job_tokens(plain, plain.text) == 101
    assert 101 + 20 < estimate_job_tokens(tooled, tooled.text) < 101 + 60


def test_a_cached_answer_keeps_its_tool_calls_parsed_value_and_logprobs() -> None:
    job = spec(tools=[tool()])
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]
    result = JobResult(id=job.id, state=JobState.SUCCEEDED, text=None, tool_calls=calls,
                       finish_reason="tool_calls", parsed={"a": 1},
                       logprobs={"content": []}, provider="echo", model="echo-1")
    entry = parse_entry(entry_json(result, job))
    again = hit_result(spec("j2", tools=[tool()]), entry, now=2000.0)
    assert again.tool_calls == result.tool_calls and again.finish_reason == "tool_calls"
    assert again.parsed == {"a": 1} and again.logprobs == {"content": []}
    assert again.text is None and again.cache == "exact"

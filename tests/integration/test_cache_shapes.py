"""The exact cache and coalescing with response formats, tools and images, through the
submit path on a real Redis-compatible server, counted where the calls happen (the echo
provider's own call log): a job is answered by a cached or in-flight job only when the
two ask for the same answer shape and the same images; a cached answer keeps its tool
calls."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from config.settings import Settings
from jobs import cache
from jobs.models import JobResult, JobState
from producers.client import Client
from tests.conftest import Procs
from tests.helpers import poll, provider_calls

pytestmark = pytest.mark.integration

DET: dict[str, Any] = {"params": {"temperature": 0}, "tenant": "acme"}
TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {
        "sku": {"type": "string"}}, "required": ["sku"]}}}


def schema(field: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "item", "schema": {
        "type": "object", "properties": {field: {"type": "string"}}, "required": [field]}}}


def photo(seed: bytes) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(seed * 48).decode()
    return [{"role": "user", "content": [{"type": "text", "text": "Which product is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def job(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Describe the item SKU-1 in one line", **DET, **fields}


def calls(settings: Settings) -> int:
    return sum(provider_calls(settings.echo_call_log).values())


def finals(client: Client, ids: list[str]) -> list[JobResult]:
    poll(lambda: all(r is not None for r in client.queue.results(ids)), timeout=60,
         interval=0.05, what="every job to finish")
    return [r for r in client.queue.results(ids) if r is not None]


@pytest.mark.slow
def test_only_jobs_with_the_same_schema_tools_and_images_share_an_answer(
        settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    shapes = [job(response_format=schema("name")), job(response_format=schema("title")),
              job(tools=[TOOL]), job(tools=[TOOL], tool_choice="required"),
              job(prompt=None, messages=photo(b"A")), job(prompt=None, messages=photo(b"B")),
              job()]
    with Client(settings) as client:
        # Two of each, pending together: each second one follows its twin, no other.
        ids = client.submit_many([s for s in shapes for _ in range(2)])
        states = client.queue.states(ids)
        assert states == ["QUEUED", "FOLLOWING"] * len(shapes)
        procs.worker(1)
        results = finals(client, ids)
        assert calls(settings) == len(shapes)
        assert [r.cache for r in results] == [None, "coalesced"] * len(shapes)
        # Again, later: each is answered at submit by its own entry, no call made.
        again = client.submit_many_states(shapes)
        assert [state for _, state in again] == [JobState.SUCCEEDED] * len(shapes)
        sources = [client.result(job_id, timeout=5).cache_source for job_id, _ in again]
        assert sources == ids[::2]
        assert calls(settings) == len(shapes)


def test_a_cached_answer_with_tool_calls_answers_only_the_same_tools(
        settings: Settings) -> None:
    """Through the submit path, with the entry a worker stores (``cache.put``)."""
    with Client(settings) as client:
        [first] = client.submit_many([job(tools=[TOOL])])
        spec = client.spec(first)
        answer = JobResult(id=first, state=JobState.SUCCEEDED, tool_calls=[{
            "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": "{\"sku\": \"SKU-1\"}"}}],
            finish_reason="tool_calls", provider="echo", model="echo-1")
        assert cache.put(client.queue, settings, [answer], {first: spec}) == 1
        [(hit, state)] = client.submit_many_states([job(tools=[TOOL])])
        assert state is JobState.SUCCEEDED
        res = client.result(hit, timeout=5)
        assert res.tool_calls == answer.tool_calls and res.finish_reason == "tool_calls"
        assert (res.cache, res.cache_source, res.text) == ("exact", first, None)
        other = {**TOOL, "function": {**TOOL["function"], "name": "lookup_v2"}}
        misses = client.submit_many_states([job(tools=[other]), job(),
                                            job(tools=[TOOL], parallel_tool_calls=False)])
        assert [state for _, state in misses] == [JobState.QUEUED] * 3

"""Providers stream inside a batch: each job's chunks reach its Redis Stream as the
server sends them; the reply is their concatenation (real HTTP server, real Redis)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from config import keys
from config.settings import Settings
from jobs.models import GenerationParams
from jobs.streams import Sink, read, text_of
from tests.fake_llm import FakeServer
from workers.providers.anthropic import AnthropicProvider
from workers.providers.base import ProviderRequest
from workers.providers.openai import OpenAIProvider
from workers.providers.simulated import CostModel, SimulatedProvider

pytestmark = pytest.mark.integration


def request(job_id: str, text: str) -> ProviderRequest:
    return ProviderRequest(job_id=job_id, model="m", params=GenerationParams(max_tokens=16),
                           prompt=text, messages=None, deadline=None, text=text, stream=True)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_each_job_streams_its_own_chunks(settings: Settings, r: Any, kind: str) -> None:
    with FakeServer() as fake:
        fake.token_delay_s = 0.0
        fake.stream_words = 6
        provider: Any = (OpenAIProvider(settings, base_url=f"{fake.url}/v1", api_key="k")
                         if kind == "openai" else
                         AnthropicProvider(settings, base_url=fake.url, api_key="k"))
        provider.sink = Sink(r, 60)
        replies = provider.complete([request("job-a", "first question"),
                                     request("job-b", "second question")])
        provider.close()
    assert [x.job_id for x in replies] == ["job-a", "job-b"]
    for reply in replies:
        assert reply.error is None, reply.error
        events = read(r, reply.job_id, block_ms=10)
        assert events[0].kind == "attempt"
        assert sum(1 for e in events if e.kind == "chunk") == 6
        assert text_of(events) == reply.text
        assert reply.usage is not None and reply.usage.completion_tokens == 6
    if kind == "anthropic":
        assert replies[0].usage is not None and replies[0].usage.cached_tokens == 100
    else:
        assert replies[0].usage is not None and replies[0].usage.cached_tokens == 8


def test_a_failed_stream_is_a_transient_error_without_an_attempt(settings: Settings,
                                                                 r: Any) -> None:
    with FakeServer() as fake:
        fake.script("overloaded", ["503", "ok"])
        provider = OpenAIProvider(settings, base_url=f"{fake.url}/v1", api_key="k")
        provider.sink = Sink(r, 60)
        [reply] = provider.complete([request("job-c", "overloaded")])
        provider.close()
    assert reply.transient and reply.error and reply.error.startswith("HTTP 503")
    assert read(r, "job-c", block_ms=10) == []  # readers saw nothing of it


def test_a_reader_that_fell_behind_the_bound_is_told_so(r: Any) -> None:
    sink = Sink(r, 60)
    sink.begin("job-d")
    for i in range(50):
        sink.chunk("job-d", f"w{i} ")
    seen = read(r, "job-d", block_ms=10)
    old = seen[3].id  # a reader that stopped early...
    r.xtrim("pb:stream:job-d", maxlen=10, approximate=False)  # ...past the bound
    events = read(r, "job-d", after=old, block_ms=10)
    assert events[0].kind == "lost"
    assert [e.kind for e in events[1:]] == ["chunk"] * 10  # it goes on from what is kept


def test_the_simulated_provider_streams_each_answer_as_its_group_decodes(r: Any) -> None:
    model = CostModel(call_overhead_s=0.05, prefill_s_per_token=0.0, decode_s_per_step=0.01,
                      decode_group=2, time_scale=1.0)
    sim = SimulatedProvider(model)
    sim.sink = Sink(r, 60)
    quiet = ProviderRequest(job_id="job-c", model="m", params=GenerationParams(max_tokens=16),
                            prompt="not streamed", messages=None, deadline=None,
                            text="not streamed")
    started = time.time()
    replies = sim.complete([request("job-a", "first question"),
                            request("job-b", "second question"), quiet])
    took = time.time() - started
    seconds, _ = SimulatedProvider(model).cost([request("a", "x")] * 3)
    assert took >= seconds * 0.95  # as long as without streaming: 0.05 + 2 groups x 16 steps
    for reply in replies[:2]:
        events = read(r, reply.job_id, block_ms=10)
        chunks = [e for e in events if e.kind == "chunk"]
        assert events[0].kind == "attempt" and len(chunks) == 16  # one per decode step
        assert text_of(events) == reply.text and reply.text.startswith("[m] answer to: ")
        # Entry ids are their millisecond times: the pieces came as the steps passed.
        at = [int(e.id.split("-")[0]) / 1000 for e in chunks]
        assert at[0] - started >= 0.05 * 0.9  # after the call's overhead
        assert at[-1] - at[0] >= 15 * 0.01 * 0.9
    assert r.exists(keys.job_stream("job-c")) == 0  # a job without stream gets none

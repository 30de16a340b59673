"""Against a real inference server: llama.cpp's llama-server with SmolLM2-135M.

Run with `make test-llm` (builds the server once, about 6 minutes on 2 cores); not part
of `make test`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.llama import MODEL_NAME, LlamaServer
from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from tests.conftest import Procs

pytestmark = [pytest.mark.llm, pytest.mark.slow, pytest.mark.integration]

SYSTEM = ("You are the support assistant of Northwind Cloud Storage. " * 40).strip()


@pytest.fixture
def llama(tmp_path: Path) -> Iterator[LlamaServer]:
    with LlamaServer(tmp_path / "llama.log", slots=4) as server:
        yield server


def test_a_batch_on_llama_server_reuses_its_shared_prefix(settings: Settings, procs: Procs,
                                                          llama: LlamaServer) -> None:
    env = {"PROMPTBATCH_OPENAI_BASE_URL": llama.base_url,
           "PROMPTBATCH_OPENAI_PREFIX_STRATEGY": "auto"}
    procs.worker(concurrency=2, **env)
    procs.scheduler(**env)
    questions = ["How do I restore a deleted file?", "Can I share a folder by link?",
                 "What does the Plus plan cost?", "How long is the trash kept?",
                 "Do you support two-factor login?", "Can I pay yearly?"]
    with Client(settings) as client:
        ids = client.submit_many(
            {"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": q}],
             "provider": "openai", "model": MODEL_NAME,
             "params": {"max_tokens": 8, "temperature": 0}} for q in questions)
        results = list(client.results(ids, timeout=300))
    assert {r.state for r in results} == {JobState.SUCCEEDED}
    assert all(r.text for r in results)
    usage = [r.usage for r in results if r.usage is not None]
    assert len(usage) == len(questions)
    assert sum(u.cached_tokens for u in usage) > 0.5 * sum(u.prompt_tokens for u in usage), \
        "the shared system prompt was not reused"


def test_a_context_too_long_fails_the_job_alone(settings: Settings, procs: Procs,
                                                tmp_path: Path) -> None:
    with LlamaServer(tmp_path / "small.log", slots=1, context=512) as small:
        procs.worker(concurrency=1, PROMPTBATCH_OPENAI_BASE_URL=small.base_url)
        procs.scheduler(PROMPTBATCH_OPENAI_BASE_URL=small.base_url)
        with Client(settings) as client:
            long_id = client.submit("word " * 3000, provider="openai", model=MODEL_NAME,
                                    params={"max_tokens": 4})
            short_id = client.submit("Say hi", provider="openai", model=MODEL_NAME,
                                     params={"max_tokens": 4})
            long_res = client.result(long_id, timeout=120)
            short_res = client.result(short_id, timeout=120)
    assert long_res.state is JobState.FAILED and long_res.attempts == 1
    assert long_res.error is not None and "context" in long_res.error.lower()
    assert short_res.state is JobState.SUCCEEDED

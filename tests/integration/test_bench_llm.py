"""Each mode of ``bench/llm.py`` runs to its end against a fake OpenAI-compatible server
on loopback (the baselines claim their batches as the scheduler does; before, they sent
tasks for jobs no batch had claimed, and the worker skipped every one of them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import llm
from tests.fake_llm import FakeServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["promptbatch", "FIFO batches", "one task per prompt"])
def test_each_mode_of_the_llm_benchmark_finishes_and_calls_each_job_once(
        mode: str, tmp_path: Path) -> None:
    jobs = llm.workload(12, 2, questions=[f"question {i}?" for i in range(12)])
    with FakeServer() as fake:
        row = llm.run_on(mode, jobs, 2, tmp_path / "run", f"{fake.url}/v1", timeout=120)
        asked = [s for s in fake.seen if s.path.endswith("/chat/completions")]
    assert row[0] == mode and row[1] == 12  # all succeeded
    questions = sorted(m["content"] for s in asked for m in s.body["messages"]
                       if m["role"] == "user")
    assert questions == sorted(f"question {i}?" for i in range(12))


def test_a_mode_that_does_not_finish_says_which_and_why(tmp_path: Path) -> None:
    jobs = llm.workload(2, 1, questions=["slow?", "slower?"])
    with FakeServer() as fake:
        fake.delay_s = 30
        with pytest.raises(llm.ModeTimedOut, match=r"mode 'one task per prompt'.*2 s"):
            llm.run_on("one task per prompt", jobs, 1, tmp_path / "run", f"{fake.url}/v1",
                       timeout=2)

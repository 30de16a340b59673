"""A fallback never serves a job it would have to drop a field of: a deployment whose
provider cannot serve the job (``jobs.capabilities``) is passed over for the next one.
Real batches against a real HTTP server on loopback (``tests.fake_llm``)."""

from __future__ import annotations

import pytest

from config.settings import Settings
from jobs.models import JobState
from tests.fake_llm import FakeLLM
from tests.integration.test_providers import fake, job, llm_settings, run_batch

pytestmark = pytest.mark.integration

__all__ = ["fake"]  # the fixture, shared


def test_a_fallback_that_cannot_serve_logprobs_is_passed_over(settings: Settings,
                                                              fake: FakeLLM) -> None:
    fake.script('"model": "dead-model"', ["503"])
    s = llm_settings(settings, fake, cooldown_failures=1, provider_max_attempts=3,
                     fallbacks={"openai|dead-model": ["anthropic|claude-test",
                                                      "openai|backup-model"]})
    results = run_batch(s, [job(f"question {i}", model="dead-model",
                                params={"logprobs": True}) for i in range(3)], warm=False)
    assert {r.state for r in results} == {JobState.SUCCEEDED}
    assert {r.model for r in results} == {"backup-model"}
    assert not [x for x in fake.seen if x.path.endswith("/v1/messages")], \
        "a job asking for logprobs was sent to the anthropic fallback"


def test_a_fallback_that_serves_the_job_is_used(settings: Settings, fake: FakeLLM) -> None:
    fake.script('"model": "dead-model"', ["503"])
    s = llm_settings(settings, fake, cooldown_failures=1, provider_max_attempts=3,
                     fallbacks={"openai|dead-model": ["anthropic|claude-test",
                                                      "openai|backup-model"]})
    results = run_batch(s, [job(f"plain {i}", model="dead-model") for i in range(3)],
                        warm=False)
    assert {r.state for r in results} == {JobState.SUCCEEDED}
    assert {r.provider for r in results} == {"anthropic"}
    assert [x for x in fake.seen if x.path.endswith("/v1/messages")]

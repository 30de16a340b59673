"""What makes two requests the same for the cache, and what a semantic hit must agree on."""

from __future__ import annotations

from typing import Any

import pytest

from config.settings import Settings
from jobs.cache import purge_pattern
from jobs.cachekey import cacheable, exact_key, guard, semantic_allowed, semantic_partition
from jobs.models import JobRequest, JobSpec
from jobs.validation import resolve

SETTINGS = Settings(_env_file=None, redis_url="redis://x", default_provider="echo",  # type: ignore[call-arg]
                    cache_shared_tenants=["s1", "s2"], cache_semantic_tenants=["acme"])
BASE: dict[str, Any] = {"messages": [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "What is 2FA?"}],
                        "params": {"temperature": 0}, "tenant": "acme"}


def spec(settings: Settings = SETTINGS, job_id: str = "j1", **change: Any) -> JobSpec:
    fields = {**BASE, **change}
    return resolve(JobRequest(**fields), job_id=job_id, now=1000.0, settings=settings)


def key(**change: Any) -> str:
    return exact_key(spec(**change), SETTINGS)


def test_the_same_request_has_the_same_key_whatever_the_job() -> None:
    assert key() == exact_key(spec(job_id="j2", priority="bulk", timeout_s=30,
                                   metadata={"x": 1}, client_id="c"), SETTINGS)


@pytest.mark.parametrize("change", [
    {"params": {"temperature": 0, "top_p": 0.5}},
    {"params": {"temperature": 0, "max_tokens": 10}},
    {"params": {"temperature": 0, "stop": ["\n"]}},
    {"params": {"temperature": 0, "seed": 7}},
    {"params": {"temperature": 0, "presence_penalty": 0.1}},
    {"params": {"temperature": 0, "frequency_penalty": 0.1}},
    {"params": {"temperature": 0.5, "seed": 1}},
    {"messages": [{"role": "system", "content": "You are verbose."},
                  {"role": "user", "content": "What is 2FA?"}]},
    {"messages": [{"role": "user", "content": "What is 2FA?"}]},
    {"tenant": "globex"},
    {"provider": "simulated"},
])
def test_every_field_that_changes_the_output_changes_the_key(change: dict[str, Any]) -> None:
    assert key(**change) != key()


def test_a_model_version_invalidates_and_shared_tenants_share() -> None:
    bumped = SETTINGS.model_copy(update={"cache_model_versions": {"echo|echo-1": "v2"}})
    assert exact_key(spec(), bumped) != key()
    assert key(tenant="s1") == key(tenant="s2") != key(tenant="s3")


def test_only_deterministic_requests_are_cached_unless_the_job_says_so() -> None:
    assert cacheable(spec(), SETTINGS)  # temperature 0
    assert cacheable(spec(params={"temperature": 1, "seed": 3}), SETTINGS)
    assert not cacheable(spec(params={}), SETTINGS)  # the provider's default temperature
    assert not cacheable(spec(params={"temperature": 0.7}), SETTINGS)
    assert cacheable(spec(params={"temperature": 0.7}, cache="exact"), SETTINGS)
    assert not cacheable(spec(cache="off"), SETTINGS)
    off = SETTINGS.model_copy(update={"cache_enabled": False})
    assert not cacheable(spec(settings=off), off)


def test_semantic_lookups_are_for_allowed_tenants_and_one_system_prompt() -> None:
    assert semantic_allowed(spec(cache="semantic"), SETTINGS)
    assert not semantic_allowed(spec(cache="semantic", tenant="globex"), SETTINGS)
    assert not semantic_allowed(spec(), SETTINGS)  # 'auto' is exact only
    other_system = spec(messages=[{"role": "system", "content": "Answer in French."},
                                  {"role": "user", "content": "What is 2FA?"}])
    assert semantic_partition(spec(), SETTINGS) != semantic_partition(other_system, SETTINGS)


@pytest.mark.parametrize(("a", "b", "differs"), [
    ("How do I enable 2FA on my account?", "How do I disable 2FA on my account?",
     "polar word"),
    ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?", "negation"),
    ("Convert 5 km to miles", "Convert 50 km to miles", "numbers"),
    ("What did Alice say to Bob?", "What did Bob say to Carol?", "names"),
    ("Translate 'good morning' to French", "Translate 'good night' to French",
     "quoted text"),
    ("Why can't I log in?", "Why can I log in?", "negation"),
    ("Sort the list in ascending order", "Sort the list in descending order", "polar word"),
    ("How do I turn on dark mode?", "How do I turn off dark mode?", "polar word"),
])
def test_the_guard_refuses_the_known_false_positives(a: str, b: str, differs: str) -> None:
    assert guard(a, b) == differs


@pytest.mark.parametrize(("a", "b"), [
    ("How do I enable 2FA on my account?", "How can I enable 2FA for my account?"),
    ("What is the capital of France?", "what's the capital of France"),
    ("Summarise this: the meeting is at 10", "Please summarise this: the meeting is at 10"),
])
def test_the_guard_lets_paraphrases_through(a: str, b: str) -> None:
    assert guard(a, b) is None


def test_purge_patterns() -> None:
    assert purge_pattern(tenant="acme") == ("acme|*|*|*", "*")
    assert purge_pattern(model="openai|gpt-4o") == ("*|openai|gpt-4o|*", "*")
    assert purge_pattern(tenant="acme", model="gpt-4o") == ("acme|*|gpt-4o|*", "*")
    assert purge_pattern(key="abc123") == ("*|*", "abc123")
    assert purge_pattern(key="acme|echo|echo-1|:abc") == ("acme|echo|echo-1|", "abc")
    assert purge_pattern(key="acme|ollama|llama3:8b|:abc") == ("acme|ollama|llama3:8b|", "abc")
    assert purge_pattern() == ("*|*|*|*", "*")

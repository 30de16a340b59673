"""The schema promise where the worker receives an answer: a real batch (``BatchRunner``)
on a real Redis-compatible server and SQLite file, against a real OpenAI-compatible HTTP
server on loopback (``tests.fake_llm``) scripted to answer JSON that does not validate.
Calls are counted at the server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from config.settings import Settings
from jobs.models import JobState
from tests.fake_llm import FakeLLM, FakeServer
from tests.integration.test_providers import llm_settings, run_batch
from workers import metrics

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "born": {"type": "integer", "minimum": 0}},
          "required": ["name", "born"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeServer() as state:
        yield state


def job(text: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "provider": "openai",
            "model": "test-model", "response_format": FORMAT, **kw}


def counted(outcome: str) -> float:
    value: float = metrics.INVALID_OUTPUTS.labels("openai", "test-model", outcome)._value.get()
    return value


def test_an_answer_that_does_not_validate_is_asked_again_with_the_error(
        settings: Settings, fake: FakeLLM) -> None:
    fake.script("extract-ada", ["say:Sure! Here is the JSON you asked for.",
                                'say:{"name": "Ada Lovelace", "born": 1815}'])
    before = counted("retried"), counted("repaired")
    [res] = run_batch(llm_settings(settings, fake), [job("extract-ada: Ada Lovelace, 1815")])
    assert res.state is JobState.SUCCEEDED, res.error
    assert res.parsed == {"name": "Ada Lovelace", "born": 1815}
    assert res.schema_retries == 1 and res.attempts == 2
    first, second = fake.requests_for("extract-ada")
    asked = second.body["messages"]
    assert asked[0] == first.body["messages"][0]
    assert asked[1] == {"role": "assistant", "content": "Sure! Here is the JSON you asked for."}
    assert asked[2]["role"] == "user" and "not JSON" in asked[2]["content"]
    assert (counted("retried"), counted("repaired")) == (before[0] + 1, before[1] + 1)


def test_an_answer_that_never_validates_fails_with_the_raw_answer_kept(
        settings: Settings, fake: FakeLLM) -> None:
    raw = '{"name": 42, "born": 1815}'
    fake.script("extract-bad", [f"say:{raw}"])
    before = counted("failed")
    s = llm_settings(settings, fake, schema_retries=2)
    [res] = run_batch(s, [job("extract-bad: someone")])
    assert res.state is JobState.FAILED
    assert res.error_code == "invalid_output" and res.text == raw and res.parsed is None
    assert res.error is not None and "content at $.name: 42 is not of type 'string'" in res.error
    assert len(fake.requests_for("extract-bad")) == 1 + s.schema_retries
    assert res.schema_retries == 2 and counted("failed") == before + 1
    assert res.usage is not None and res.usage.prompt_tokens == 12 * 3  # all three answers


def test_nothing_is_asked_again_past_the_deadline(settings: Settings, fake: FakeLLM) -> None:
    fake.script("extract-late", ["say:not json"])
    fake.delay_s = 1.0  # the answer comes after the job's deadline
    [res] = run_batch(llm_settings(settings, fake, provider_read_timeout_s=3.0),
                      [job("extract-late", timeout_s=0.6)])
    assert res.state is JobState.FAILED and res.error_code == "invalid_output"
    assert res.error is not None and "deadline" in res.error
    assert len(fake.requests_for("extract-late")) == 1


def test_schema_retries_zero_fails_at_the_first_invalid_answer(settings: Settings,
                                                               fake: FakeLLM) -> None:
    fake.script("extract-once", ["say:[1, 2]", 'say:{"name": "x", "born": 1}'])
    [res] = run_batch(llm_settings(settings, fake, schema_retries=0),
                      [job("extract-once", response_format={"type": "json_object"})])
    assert res.state is JobState.FAILED and res.text == "[1, 2]"
    assert res.error is not None and "must be a JSON object, not list" in res.error
    assert len(fake.requests_for("extract-once")) == 1

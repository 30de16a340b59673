"""Structured outputs and tools against a real inference server: llama.cpp's llama-server
with SmolLM2-135M (``make test-llm``; not part of ``make test``).

llama-server turns a ``json_schema`` response format into a grammar, so even this small
model answers JSON that validates every time. Tools are another matter (measured with
this build): SmolLM2's own chat template does not render them, and llama-server answers
in prose with ``tool_choice`` ``required`` too; the test checks that such a request is
taken and answered, not that the model calls the tool.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from bench.llama import MODEL_NAME, LlamaServer
from config.settings import Settings
from jobs.models import JobState
from tests.integration.test_provider_shapes import WEATHER, run_jobs

# A shared, loaded machine runs this small model at a few tokens a second.
pytestmark = [pytest.mark.llm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.timeout(900)]

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "city": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 130}},
    "required": ["name", "city", "age"], "additionalProperties": False}
PEOPLE = ["Anna Berg, 34, lives in Oslo and works as a nurse.",
          "Carlos Diaz is a 51-year-old baker from Valencia.",
          "Meet Li Wei (27), a Shanghai-based software engineer.",
          "Fatima Noor, aged 45, teaches maths in Lahore.",
          "The retired pilot John Smith (70) now lives in Leeds.",
          "Sophie Martin, 19, studies law in Lyon.",
          "Kwame Mensah, a 38 year old farmer near Kumasi.",
          "Olga Petrova, 62, a librarian in Kazan."]


@pytest.fixture
def llama(tmp_path: Path) -> Iterator[LlamaServer]:
    with LlamaServer(tmp_path / "llama.log", slots=2) as server:
        yield server


def on_llama(settings: Settings, llama: LlamaServer) -> Settings:
    return settings.model_copy(update={
        "openai_base_url": llama.base_url, "openai_prefix_strategy": "sequential",
        "provider_read_timeout_s": 300.0, "provider_total_timeout_s": 600.0})


def test_every_json_schema_answer_validates_without_a_retry(settings: Settings,
                                                            llama: LlamaServer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                  "strict": True}}
    results = run_jobs(on_llama(settings, llama), [
        {"messages": [{"role": "system", "content": "Extract the person as JSON."},
                      {"role": "user", "content": text}],
         "provider": "openai", "model": MODEL_NAME, "response_format": fmt,
         "params": {"max_tokens": 96, "temperature": 0}} for text in PEOPLE])
    assert [r.state for r in results] == [JobState.SUCCEEDED] * len(PEOPLE)
    assert [r.attempts for r in results] == [1] * len(PEOPLE)
    for result in results:
        jsonschema.validate(json.loads(result.text or ""), SCHEMA)


def test_a_request_with_tools_is_taken_and_answered(settings: Settings,
                                                    llama: LlamaServer) -> None:
    [result] = run_jobs(on_llama(settings, llama), [
        {"prompt": "What is the weather in Paris right now?", "provider": "openai",
         "model": MODEL_NAME, "tools": [WEATHER], "tool_choice": "required",
         "params": {"max_tokens": 32, "temperature": 0}}])
    assert result.state is JobState.SUCCEEDED, result.error
    assert result.text or result.tool_calls
    assert result.finish_reason in ("stop", "length", "tool_calls")

"""Validation of job requests: every refusal names the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from config.settings import Settings
from jobs.errors import InvalidJob
from jobs.models import JobRequest, Priority
from jobs.validation import parse_request, resolve

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC).timestamp()
SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]


def fields_of(data: object) -> list[str]:
    with pytest.raises(InvalidJob) as info:
        req = parse_request(data)
        resolve(req, job_id="j", now=NOW, settings=SETTINGS)
    return info.value.fields


@pytest.mark.parametrize(("data", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t"}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"prompt": "hi", "priority": True}, "priority"),
    ({"prompt": "hi", "priority": 5}, "priority"),
    ({"prompt": "hi", "priority": -1}, "priority"),
    ({"prompt": "hi", "priority": 1.5}, "priority"),
    ({"prompt": "hi", "priority": "urgent"}, "priority"),
    ({"prompt": "hi", "deadline": "2030-01-01T00:00:00"}, "deadline"),
    ({"prompt": "hi", "deadline": "2020-01-01T00:00:00Z"}, "deadline"),
    ({"prompt": "hi", "timeout_s": 0}, "timeout_s"),
    ({"prompt": "hi", "timeout_s": float("nan")}, "timeout_s"),
    ({"prompt": "hi", "params": {"temperature": float("inf")}}, "params.temperature"),
    ({"prompt": "hi", "params": {"temperature": 3}}, "params.temperature"),
    ({"prompt": "hi", "params": {"max_tokens": 0}}, "params.max_tokens"),
    ({"prompt": "hi", "params": {"colour": "blue"}}, "params.colour"),
    ({"prompt": "hi", "metadata": {"score": float("nan")}}, "metadata.score"),
    ({"prompt": "hi", "metadata": {"tags": ["a"]}}, "metadata.tags"),
    ({"prompt": "hi", "provider": "nonesuch"}, "provider"),
    ({"prompt": "hi", "provider": "echo", "model": "gpt-9"}, "model"),
    ({"prompt": "hi", "tenant": "a b"}, "tenant"),
    ({"prompt": "hi", "colour": "blue"}, "colour"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "(body)"),
    ([1, 2], "(body)"),
])
def test_bad_input_is_refused_naming_the_field(data: object, field: str) -> None:
    assert field in fields_of(data)


def test_a_valid_request_resolves_with_defaults_and_an_absolute_deadline() -> None:
    req = parse_request({"prompt": "Summarise this", "priority": "HIGH", "timeout_s": 30,
                         "params": {"stop": "\n", "temperature": 0}})
    spec = resolve(req, job_id="j1", now=NOW, settings=SETTINGS, tenant="acme")
    assert spec.priority is Priority.HIGH
    assert spec.deadline == NOW + 30
    assert (spec.provider, spec.model, spec.tenant) == ("echo", "echo-1", "acme")
    assert spec.params.stop == ["\n"]


@pytest.mark.parametrize(("value", "expected"), [
    ("critical", Priority.CRITICAL), ("bulk", Priority.BULK), (0, Priority.CRITICAL),
    (4, Priority.BULK), (" Normal ", Priority.NORMAL)])
def test_priority_accepts_names_and_numbers(value: object, expected: Priority) -> None:
    assert JobRequest.model_validate({"prompt": "x", "priority": value}).priority is expected


def test_aware_deadline_is_kept() -> None:
    deadline = datetime.fromtimestamp(NOW, UTC) + timedelta(minutes=5)
    req = parse_request({"prompt": "x", "deadline": deadline.isoformat()})
    assert resolve(req, job_id="j", now=NOW, settings=SETTINGS).deadline == NOW + 300


def test_compatibility_key_separates_params() -> None:
    a = resolve(parse_request({"prompt": "x", "params": {"temperature": 0}}), job_id="a",
                now=NOW, settings=SETTINGS)
    b = resolve(parse_request({"prompt": "x", "params": {"temperature": 0.5}}), job_id="b",
                now=NOW, settings=SETTINGS)
    c = resolve(parse_request({"prompt": "y", "params": {"temperature": 0}}), job_id="c",
                now=NOW, settings=SETTINGS)
    assert a.compat_key != b.compat_key
    assert a.compat_key == c.compat_key
    # The same parameters written differently share a key (a string stop is a list of
    # one, an integer temperature a float; keys given in any order).
    d = resolve(parse_request({"prompt": "x", "params": {"stop": "END", "temperature": 1}}),
                job_id="d", now=NOW, settings=SETTINGS)
    e = resolve(parse_request({"prompt": "z", "params": {"temperature": 1.0, "stop": ["END"]}}),
                job_id="e", now=NOW, settings=SETTINGS)
    assert d.compat_key == e.compat_key != a.compat_key


def test_prompt_over_the_size_limit_is_refused() -> None:
    small = Settings(max_prompt_chars=10, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(InvalidJob) as info:
        resolve(parse_request({"prompt": "x" * 11}), job_id="j", now=NOW, settings=small)
    assert info.value.fields == ["prompt"]


def test_settings_refuse_a_time_limit_above_the_visibility_timeout() -> None:
    with pytest.raises(ValueError, match="visibility_timeout_s"):
        Settings(task_time_limit_s=400, visibility_timeout_s=360,
                 _env_file=None)  # type: ignore[call-arg]

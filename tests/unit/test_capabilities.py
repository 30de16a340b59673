"""What each provider serves (``jobs.capabilities``): a job asking for what its provider
cannot serve is refused at submit, naming the field; the others pass untouched."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from config.settings import Settings
from jobs.capabilities import CAPABILITIES, serves, unserved
from jobs.chat import Message
from jobs.errors import InvalidJob
from jobs.models import GenerationParams
from jobs.validation import PROVIDER_DEFAULT_MODELS, parse_request, resolve

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def image(size: int) -> dict[str, Any]:
    data = base64.b64encode(b"\x89PNG" + b"\0" * (size - 4)).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def refused(provider: str, settings: Settings = SETTINGS, **fields: Any) -> list[str]:
    request = {"messages": [{"role": "user", "content": "hi"}], "provider": provider,
               **fields}
    try:
        resolve(parse_request(request), job_id="j", now=1.0, settings=settings)
    except InvalidJob as exc:
        return exc.fields
    return []


EVERYTHING: dict[str, Any] = {
    "params": {"logprobs": True, "top_logprobs": 5, "seed": 1, "presence_penalty": 1,
               "frequency_penalty": -1, "temperature": 1.5, "top_p": 0.5, "stop": ["x"]},
    "tools": [TOOL], "tool_choice": "none", "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
}


@pytest.mark.parametrize("provider", ["echo", "simulated", "openai"])
def test_echo_simulated_and_openai_compatible_serve_every_field(provider: str) -> None:
    assert refused(provider, **EVERYTHING) == []
    big = [{"role": "user", "content": [image(6 * 1024 * 1024)] * 2}]
    roomy = SETTINGS.model_copy(update={"max_image_bytes": 8 * 1024 * 1024})
    assert refused(provider, roomy, messages=big) == []


@pytest.mark.parametrize("provider", ["echo", "simulated", "openai", "anthropic"])
def test_the_deployments_image_bound_applies_to_every_provider(provider: str) -> None:
    at = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                        image(SETTINGS.max_image_bytes)]}]
    over = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                          image(SETTINGS.max_image_bytes + 1)]}]
    assert refused(provider, messages=at) == []
    assert refused(provider, messages=over) == ["messages.0.content.1.image_url.url"]
    small = SETTINGS.model_copy(update={"max_image_bytes": 2048})
    assert refused(provider, small, messages=[{"role": "user", "content": [
        image(2048), image(2049), {"type": "image_url", "image_url": {
            "url": "https://example.com/" + "x" * 4000}}]}]) == [
        "messages.0.content.1.image_url.url"]
    # One error an image, naming the deployment's bound where both are passed.
    errors = unserved(provider, GenerationParams(), [Message.model_validate(over[0])],
                      max_image_bytes=1024)
    assert [f for f, _ in errors] == ["messages.0.content.1.image_url.url"]
    assert "max_image_bytes" in errors[0][1]


@pytest.mark.parametrize(("params", "field"), [
    ({"logprobs": True}, "params.logprobs"),
    ({"logprobs": True, "top_logprobs": 2}, "params.top_logprobs"),
    ({"seed": 42}, "params.seed"),
    ({"presence_penalty": 0.5}, "params.presence_penalty"),
    ({"frequency_penalty": 0.5}, "params.frequency_penalty"),
    ({"temperature": 1.2}, "params.temperature"),
])
def test_anthropic_refuses_what_its_messages_api_has_not(params: dict[str, Any],
                                                         field: str) -> None:
    assert field in refused("anthropic", params=params)


def test_anthropic_serves_the_rest_and_bounds_its_images() -> None:
    assert refused("anthropic", params={"temperature": 1.0, "top_p": 0.9, "stop": ["\n"],
                                        "max_tokens": 20, "logprobs": False},
                   tools=[TOOL], tool_choice="required", parallel_tool_calls=True,
                   response_format={"type": "json_schema", "json_schema": {
                       "name": "x", "schema": {"type": "object"}}}) == []
    ok = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                        image(4 * 1024 * 1024)]}]
    assert refused("anthropic", messages=ok) == []
    over = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                          image(5 * 1024 * 1024 + 1)]}]
    assert refused("anthropic", messages=over) == ["messages.0.content.1.image_url.url"]
    many = [{"role": "user", "content": [image(16)] * 101}]
    assert refused("anthropic", messages=many) == ["messages"]


def test_the_message_says_which_provider_and_what_to_do() -> None:
    errors = dict(unserved("anthropic", GenerationParams(seed=3, logprobs=True), None))
    assert "anthropic" in errors["params.seed"] and "leave it out" in errors["params.seed"]
    assert "openai" in errors["params.logprobs"]


def test_serves_is_the_fallback_check_and_unknown_providers_serve_everything() -> None:
    params = GenerationParams(logprobs=True)
    msgs = [Message(role="user", content="hi")]
    assert not serves("anthropic", params, msgs)
    assert serves("openai", params, msgs) and serves("someday", params, msgs)
    # Every provider a job may name has its line in the table.
    assert set(CAPABILITIES) == set(PROVIDER_DEFAULT_MODELS)

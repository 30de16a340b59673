"""Turning untrusted input into a ``JobSpec``, or an ``InvalidJob`` that names the field.

Pure: the clock (``now``) and the id are arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from config.settings import Settings
from jobs.capabilities import unserved
from jobs.chat import as_response_format
from jobs.errors import InvalidJob
from jobs.lanes import refusal as lane_refusal
from jobs.models import GenerationParams, JobRequest, JobSpec

#: Providers a job may name, with the model used when the job names none.
PROVIDER_DEFAULT_MODELS: dict[str, str] = {
    "echo": "echo-1",
    "simulated": "sim-1",
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
}


#: OpenAI request fields that stay unserved, on every path (the chat endpoint, Batch
#: lines, jobs and JSONL lines): why, and what to do. Refused when set to anything but
#: the value that asks for nothing (``asks_nothing``).
UNSERVED: dict[str, str] = {
    "n": "only n=1 is served (send n requests)",
    "audio": "audio output is not served",
    "modalities": "only text output is served (modalities: ['text'])",
    "prediction": "predicted outputs are not served",
    "web_search_options": "web search is not served",
    "functions": "not served (deprecated by OpenAI): use tools",
    "function_call": "not served (deprecated by OpenAI): use tool_choice",
    "logit_bias": "not served: leave it out",
    "reasoning_effort": "not served: leave it out",
    "verbosity": "not served: leave it out",
}
#: The values of unserved fields that ask for nothing (accepted, not used).
_NOTHING: dict[str, tuple[Any, ...]] = {"n": (None, 1), "modalities": (None, ["text"]),
                                        "logit_bias": (None, {})}


def asks_nothing(field: str, value: Any) -> bool:
    """Whether an unserved field's value asks for nothing (``n`` 1, ``modalities``
    ``["text"]``...): it is accepted and not used."""
    return value in _NOTHING.get(field, (None,))


#: Branch names pydantic puts in an error's location inside a union (never a field of ours).
_UNION_TAGS = frozenset({"str", "list", "int", "float", "bool", "none", "dict"})


#: Plain words for pydantic's parser messages, by error type: a whole number past 64 bits
#: comes from the JSON reader as a float (``jobs.jsonbody``), which pydantic calls "Unable
#: to parse input string as an integer, exceeded maximum size".
_PLAIN = {"int_parsing_size": "a number too large (a whole number must fit in 64 bits)"}


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` pairs of a pydantic error, the field as a dotted path."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        # Without the tags pydantic puts in a location for a union's branch.
        loc = ".".join(str(part) for part in err["loc"]
                       if part not in _UNION_TAGS and "[" not in str(part)) or "(body)"
        msg = _PLAIN.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        out.append((loc, msg))
    return out


def parse_request(data: Any, *, line: int | None = None) -> JobRequest:
    """Validate a JSON-like mapping as a ``JobRequest``. OpenAI's unserved fields
    (``n``, ``audio``...) are refused with what the chat endpoint says of them, at the
    top or in ``params``; set to what asks for nothing (``n``: 1) they are dropped."""
    if isinstance(data, JobRequest):
        return data
    if not isinstance(data, Mapping):
        raise InvalidJob([("(body)", "a job must be a JSON object")], line=line)
    data = _without_nothing(data)
    if isinstance(data.get("response_format"), type):  # a pydantic model class
        data = {**data, "response_format": as_response_format(data["response_format"])}
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(_served_words(exc), line=line) from exc


def _without_nothing(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` without the unserved fields that ask for nothing (``n``: 1), at the top
    and in ``params``."""
    params = data.get("params")
    idle = [k for k in UNSERVED if k in data and asks_nothing(k, data[k])]
    idle_params = [k for k in UNSERVED if isinstance(params, Mapping) and k in params
                   and asks_nothing(k, params[k])]
    if not idle and not idle_params:
        return data
    out = {k: v for k, v in data.items() if k not in idle}
    if idle_params:
        assert isinstance(params, Mapping)
        out["params"] = {k: v for k, v in params.items() if k not in idle_params}
    return out


#: Generation parameters (a JSONL line or a job may put them only in ``params``).
_PARAMS = frozenset(GenerationParams.model_fields)


def _served_words(exc: ValidationError) -> list[tuple[str, str]]:
    """``field_errors``, where an unknown field that is one of OpenAI's unserved ones
    (``n``, ``params.n``) says so as the chat endpoint does, and a generation parameter
    at the top says where it goes."""
    out = []
    for err, (field, message) in zip(exc.errors(), field_errors(exc), strict=True):
        name = field.removeprefix("params.")
        if err["type"] == "extra_forbidden" and name in UNSERVED:
            message = UNSERVED[name]
        elif err["type"] == "extra_forbidden" and field in _PARAMS:
            message = f"a generation parameter: put it in params ({{'params': {{'{field}': " \
                      "...}})"
        out.append((field, message))
    return out


def resolve(
    request: JobRequest,
    *,
    job_id: str,
    now: float,
    settings: Settings,
    tenant: str | None = None,
    line: int | None = None,
) -> JobSpec:
    """Fill in defaults and check what needs settings or the clock.

    ``tenant``, when given (an authenticated caller), overrides the request's own.
    """
    errors: list[tuple[str, str]] = []
    tenant = tenant or request.tenant or settings.default_tenant
    provider = request.provider or settings.default_provider
    if provider not in PROVIDER_DEFAULT_MODELS:
        errors.append(("provider", f"unknown provider {provider!r}; known: "
                       f"{', '.join(sorted(PROVIDER_DEFAULT_MODELS))}"))
        model = request.model or ""
    else:
        model = request.model or settings.default_model or PROVIDER_DEFAULT_MODELS[provider]
        allowed = settings.allowed_models.get(provider)
        provider_ok, model_ok = settings.may_use(tenant, provider, model)
        if allowed and model not in allowed:
            errors.append(("model", f"unknown model {model!r} for provider {provider!r}; "
                           f"allowed: {', '.join(allowed)}"))
        elif not provider_ok:
            errors.append(("provider", f"tenant {tenant!r} may not use provider {provider!r} "
                           "(tenant_providers)"))
        elif not model_ok:
            errors.append(("model", f"tenant {tenant!r} may not use model {model!r} of "
                           f"provider {provider!r} (tenant_providers)"))
        errors += unserved(provider, request.params, request.messages,
                           settings.max_image_bytes)
        refused = lane_refusal(provider, model, request.lane, request.stream, settings)
        if refused is not None:
            errors.append(refused)
    text_len = len(request.prompt) if request.prompt is not None else sum(
        len(m.text) for m in request.messages or ())
    if text_len > settings.max_prompt_chars:
        errors.append(("prompt" if request.prompt is not None else "messages",
                       f"{text_len} characters is over the limit of {settings.max_prompt_chars}"))
    deadline: float | None = None
    if request.deadline is not None:
        deadline = request.deadline.timestamp()
        if deadline <= now:
            errors.append(("deadline", "is in the past"))
    elif request.timeout_s is not None:
        deadline = now + request.timeout_s
    if errors:
        raise InvalidJob(errors, line=line)
    return JobSpec(
        id=job_id,
        tenant=tenant,
        priority=request.priority,
        created_at=now,
        deadline=deadline,
        provider=provider,
        model=model,
        params=request.params,
        prompt=request.prompt,
        messages=request.messages,
        idempotency_key=request.idempotency_key,
        client_id=request.client_id,
        metadata=request.metadata, cache=request.cache, stream=request.stream,
        response_format=request.response_format, tools=request.tools,
        tool_choice=request.tool_choice, parallel_tool_calls=request.parallel_tool_calls,
        lane=request.lane,
        request_hash=request_digest(request, tenant) if request.idempotency_key else None,
    )


def request_digest(request: JobRequest, tenant: str) -> str:
    """What an idempotency key is bound to: the request as submitted (every field but the
    key itself) and its tenant."""
    body = request.model_dump_json(exclude={"idempotency_key"}, exclude_defaults=True)
    return hashlib.sha256(f"{tenant}\n{body}".encode()).hexdigest()[:32]

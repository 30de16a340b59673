"""An OpenAI request body as a promptbatch job: the one translation that
``/v1/chat/completions``, ``/v1/completions`` and the Batch API's lines share.

A chat body's ``messages`` (string content or parts, assistant ``tool_calls``, ``tool``
messages), ``response_format``, ``tools``, ``tool_choice`` and ``parallel_tool_calls``
pass as they are (the job's fields have OpenAI's shapes); ``temperature``, ``top_p``,
``stop``, ``seed``, the penalties, ``logprobs``, ``top_logprobs`` and ``max_tokens`` (or
``max_completion_tokens``) become the job's parameters. Fields that do not change the
answer (``user``, ``store``, ``service_tier``...) are accepted and not used; fields
OpenAI has that stay unserved (``n`` above 1, ``audio``, ``modalities`` other than text,
``prediction``, ``web_search_options``, the deprecated ``functions`` and
``function_call``, a non-empty ``logit_bias``...) are refused by name, as is any field
OpenAI does not have. Every error names the field as the caller wrote it
(``max_completion_tokens``, ``messages.1.tool_call_id``, ``tools.0.function.name``;
``body.temperature`` in a Batch line).

Pure: no I/O; the model name is left to the caller (``producers.models.resolve_model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobs.errors import InvalidJob
from jobs.validation import UNSERVED, asks_nothing

#: OpenAI fields that become the job's generation parameters, by the same name.
PARAMS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
          "logprobs", "top_logprobs")
#: OpenAI fields of a chat request the job carries as they are.
SHAPES = ("response_format", "tools", "tool_choice", "parallel_tool_calls")
#: OpenAI fields accepted and not used: they do not change the answer.
IGNORED = frozenset({"user", "stream_options", "service_tier", "store", "safety_identifier",
                     "prompt_cache_key"})
#: Our own job fields a chat or completions body may carry beside OpenAI's.
OURS = ("priority", "timeout_s", "deadline", "idempotency_key", "cache", "metadata",
        "client_id")
def _refusals(body: Mapping[str, Any], *, chat: bool, ours: bool,
              batch: bool) -> list[tuple[str, str]]:
    """What the body asks that is not served, or leaves out, by field."""
    known = {"model", "max_tokens", "max_completion_tokens", "stream", *PARAMS, *IGNORED,
             *(("messages", *SHAPES) if chat else ("prompt",)), *(OURS if ours else ()),
             *(() if ours else ("metadata",))}
    errors: list[tuple[str, str]] = []
    for k, v in body.items():
        if k in UNSERVED:
            if not asks_nothing(k, v):
                errors.append((k, UNSERVED[k]))
        elif k not in known:
            errors.append((k, "unknown field" if chat or k not in SHAPES else
                           "not served by /v1/completions: use /v1/chat/completions"))
    if not isinstance(body.get("model"), str) or not body.get("model"):
        errors.append(("model", "required: a model name"))
    if chat and "messages" not in body:
        errors.append(("messages", "required"))
    if not chat and not isinstance(body.get("prompt"), str):
        errors.append(("prompt", "a string (lists of prompts are not served)"))
    if not chat and body.get("logprobs") is not None:
        errors.append(("logprobs", "not served by /v1/completions: use "
                       "/v1/chat/completions with logprobs: true and top_logprobs"))
    if batch and body.get("stream"):
        errors.append(("stream", "a Batch API request is not streamed"))
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        errors.append(("top_logprobs", "needs logprobs: true"))
    return errors


def job_fields(body: Any, *, chat: bool = True, ours: bool = True,
               batch: bool = False) -> dict[str, Any]:
    """The ``JobRequest`` fields of an OpenAI request body (``chat``: a chat completion,
    else a text completion), without ``provider``/``model`` (the caller resolves
    ``body["model"]``). ``ours``: the body may carry our own job fields (``priority``,
    ``timeout_s``...); ``batch``: a Batch API line's body (not streamed). Raises
    ``InvalidJob`` naming each field as the caller wrote it."""
    if not isinstance(body, Mapping):
        raise InvalidJob([("(body)", "must be a JSON object")])
    errors = _refusals(body, chat=chat, ours=ours, batch=batch)
    if errors:
        raise InvalidJob(errors)
    item: dict[str, Any] = ({"messages": body["messages"]} if chat
                            else {"prompt": body["prompt"]})
    params = {k: body[k] for k in PARAMS if body.get(k) is not None}
    if params.get("logprobs") is False:
        del params["logprobs"]  # the default: the same job as without it
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        params["max_tokens"] = limit
    item["params"] = params
    if chat:
        item.update({k: body[k] for k in SHAPES if body.get(k) is not None})
    if body.get("stream"):
        item["stream"] = True
    if ours:
        item.update({k: body[k] for k in OURS if k in body})
    return item


def openai_field(field: str, body: Mapping[str, Any], prefix: str = "") -> str:
    """The name the caller wrote for a ``JobRequest`` field (``params.max_tokens`` ->
    ``max_completion_tokens`` when the body has it, ``params.seed`` -> ``seed``,
    ``provider`` -> ``model``), after ``prefix`` (``body.`` for a Batch line)."""
    head, _, rest = field.partition(".")
    if head == "params" and rest:
        name, _, tail = rest.partition(".")
        if name == "max_tokens" and "max_completion_tokens" in body:
            name = "max_completion_tokens"
        field = f"{name}.{tail}" if tail else name
    elif head == "provider":
        field = "model"
    elif field == "(body)":
        return prefix.rstrip(".") or field
    return f"{prefix}{field}"


def openai_errors(exc: InvalidJob, body: Mapping[str, Any], prefix: str = "",
                  ) -> InvalidJob:
    """``exc`` with its fields named as the caller wrote them (``openai_field``)."""
    return InvalidJob([(openai_field(f, body, prefix), m) for f, m in exc.errors],
                      line=exc.line)

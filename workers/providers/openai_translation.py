"""Translation between a job and OpenAI's Chat Completions API, both directions.

OpenAI's shapes are the job's own, so a request passes through: messages as
``Message.payload()`` (content parts, assistant ``tool_calls``, ``tool`` messages),
``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls`` (the last two only
beside ``tools``: OpenAI refuses them alone), ``logprobs`` and ``top_logprobs``. An
answer comes back as the message the server gave: ``content`` (null beside tool calls),
``tool_calls``, ``refusal`` (a success: the model declined, as OpenAI's SDK shows it on
``message.refusal``), ``finish_reason`` and ``choice.logprobs``. An answer with none of
content, tool calls or refusal is an error, as is a malformed one.

``ChatStream`` folds a streamed answer's chunks into the same reply: content deltas,
tool call deltas by ``index`` (id and name once, arguments in fragments), refusal
deltas, logprobs, the last ``finish_reason`` and the usage chunk.

Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast, get_args

from pydantic import ValidationError

from jobs.chat import FinishReason, ToolCall, canonical
from jobs.models import Usage
from workers.providers.base import ProviderReply, ProviderRequest

#: Generation parameters sent to ``/v1/chat/completions`` as they are.
CHAT_PARAMS = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty",
               "frequency_penalty", "logprobs", "top_logprobs")
#: Those ``/v1/completions`` takes in the same shape (its ``logprobs`` is a count).
COMPLETION_PARAMS = CHAT_PARAMS[:7]
_REASONS: frozenset[str] = frozenset(get_args(FinishReason))
#: Finish reasons of older or other servers, in today's terms.
_REASON_ALIASES = {"function_call": "tool_calls", "eos": "stop", "eos_token": "stop",
                   "max_tokens": "length"}


class MalformedAnswer(ValueError):
    """Raised when a 2xx answer does not have the shape of a chat completion."""


def needs_chat(req: ProviderRequest) -> bool:
    """Whether a request carries what only ``/v1/chat/completions`` takes (messages, a JSON
    response format, tools, logprobs): such a job never goes to ``/v1/completions``."""
    fmt = req.response_format
    return bool(req.prompt is None or (fmt is not None and fmt.type != "text") or req.tools
                or req.tool_choice is not None or req.parallel_tool_calls is not None
                or req.params.logprobs)


def params(req: ProviderRequest, names: tuple[str, ...] = CHAT_PARAMS) -> dict[str, Any]:
    """The request's generation parameters that are set, among ``names``."""
    p = req.params.model_dump(exclude_none=True)
    return {k: p[k] for k in names if k in p}


def to_openai(req: ProviderRequest, cache_key: str | None = None) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body of a request (without ``stream``)."""
    messages = ([m.payload() for m in req.messages] if req.messages is not None
                else [{"role": "user", "content": req.prompt}])
    body: dict[str, Any] = {"model": req.model, "messages": messages, **params(req)}
    if req.response_format is not None:
        body["response_format"] = json.loads(canonical(req.response_format))
    if req.tools is not None:  # tool_choice, parallel_tool_calls: only beside tools
        body["tools"] = json.loads(canonical(list(req.tools)))
        if req.tool_choice is not None:
            body["tool_choice"] = json.loads(canonical(req.tool_choice))
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if cache_key:
        body["prompt_cache_key"] = cache_key
    return body


def finish_reason(value: Any) -> FinishReason | None:
    """OpenAI's ``finish_reason`` (older and other servers' names mapped); None when
    absent or unknown."""
    if not isinstance(value, str):
        return None
    value = _REASON_ALIASES.get(value, value)
    return cast("FinishReason", value) if value in _REASONS else None


def parse_usage(data: dict[str, Any]) -> Usage | None:
    """OpenAI's ``usage``, with ``prompt_tokens_details.cached_tokens`` (None if absent)."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    return Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                 completion_tokens=int(usage.get("completion_tokens") or 0),
                 cached_tokens=int(details.get("cached_tokens") or 0))


def tool_call(raw: Any, i: int) -> ToolCall:
    """One of a message's ``tool_calls``; arguments a server gave as an object are kept
    as their JSON string, an id it left out is ``call_<i>``."""
    if not isinstance(raw, dict) or raw.get("type", "function") != "function":
        raise MalformedAnswer(f"tool_calls[{i}] is not a function call: {raw!r}")
    fn = raw.get("function")
    if not isinstance(fn, dict):
        raise MalformedAnswer(f"tool_calls[{i}] has no function")
    args = fn.get("arguments")
    if args is None:
        args = "{}"
    elif not isinstance(args, str):
        args = json.dumps(args)
    try:
        return ToolCall.model_validate({"id": raw.get("id") or f"call_{i}", "type": "function",
                                        "function": {"name": fn.get("name"),
                                                     "arguments": args}})
    except ValidationError as exc:
        raise MalformedAnswer(f"tool_calls[{i}]: {exc.errors()[0]['msg']}") from exc


def answer(job_id: str, *, content: Any, tool_calls: tuple[ToolCall, ...] | None,
           refusal: Any, reason: FinishReason | None, logprobs: Any, usage: Usage | None,
           raw: str, why_empty: str | None = None) -> ProviderReply:
    """The reply for a finished answer's parts: content, tool calls or a refusal, else an
    error that says why it is empty."""
    if content is not None and not isinstance(content, str):
        raise MalformedAnswer(f"content is a {type(content).__name__}, not a string")
    if refusal is not None and not isinstance(refusal, str):
        raise MalformedAnswer(f"refusal is a {type(refusal).__name__}, not a string")
    if not content and not tool_calls and not refusal:
        if why_empty is None:
            why_empty = ("the content filter withheld it" if reason == "content_filter" else
                         f"finish_reason {reason!r}" if reason else "no content")
        return ProviderReply(job_id=job_id, error=f"empty answer ({why_empty}): {raw}")
    return ProviderReply(job_id=job_id, text=content or None, usage=usage,
                         tool_calls=tool_calls or None, refusal=refusal or None,
                         finish_reason=reason,
                         logprobs=logprobs if isinstance(logprobs, dict) else None)


def from_openai(job_id: str, data: Any, raw: str = "") -> ProviderReply:
    """The reply for a ``/v1/chat/completions`` answer's JSON (``raw``: its body, kept with
    an error)."""
    try:
        choices = data["choices"]
        if not choices:
            return ProviderReply(job_id=job_id, error=f"no answer (empty choices): {raw}")
        choice = choices[0]
        message = choice["message"]
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise MalformedAnswer("tool_calls is not a list")
        return answer(job_id, content=message.get("content"),
                      tool_calls=tuple(tool_call(c, i) for i, c in enumerate(calls)),
                      refusal=message.get("refusal"),
                      reason=finish_reason(choice.get("finish_reason")),
                      logprobs=choice.get("logprobs"), usage=parse_usage(data), raw=raw)
    except (KeyError, IndexError, TypeError, AttributeError, MalformedAnswer) as exc:
        return ProviderReply(job_id=job_id, error=f"malformed response ({exc!r}): {raw}")


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class ChatStream:
    """A streamed chat answer, folded chunk by chunk (``add``) into one reply (``reply``)."""

    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    reason: FinishReason | None = None
    usage: Usage | None = None
    chunks: int = 0

    def add(self, chunk: dict[str, Any]) -> str:
        """Fold one chunk in; the content it adds ('' if none), for the job's stream."""
        self.chunks += 1
        self.usage = parse_usage(chunk) or self.usage
        added: list[str] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                added.append(delta["content"])
            if isinstance(delta.get("refusal"), str):
                self.refusal.append(delta["refusal"])
            for i, raw in enumerate(delta.get("tool_calls") or ()):
                self._add_call(raw, i)
            for key, items in (choice.get("logprobs") or {}).items():
                if isinstance(items, list):
                    self.logprobs.setdefault(key, []).extend(items)
            self.reason = finish_reason(choice.get("finish_reason")) or self.reason
        self.content += added
        return "".join(added)

    def _add_call(self, raw: Any, position: int) -> None:
        if not isinstance(raw, dict):
            raise MalformedAnswer(f"a tool call delta is not an object: {raw!r}")
        index = raw.get("index", position)
        call = self.calls.setdefault(int(index), _PartialCall())
        call.id = call.id or raw.get("id") or ""
        fn = raw.get("function") or {}
        call.name += fn.get("name") or ""
        if isinstance(fn.get("arguments"), str):
            call.arguments.append(fn["arguments"])

    def reply(self, job_id: str) -> ProviderReply:
        """The reply for everything streamed (an error when it held no answer)."""
        try:
            calls = tuple(tool_call({"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": "".join(c.arguments) or "{}"}}, i)
                for i, c in sorted(self.calls.items()))
            return answer(job_id, content="".join(self.content), tool_calls=calls,
                          refusal="".join(self.refusal) or None, reason=self.reason,
                          logprobs=self.logprobs or None, usage=self.usage,
                          raw=f"{self.chunks} chunks", why_empty="no content streamed")
        except MalformedAnswer as exc:
            return ProviderReply(job_id=job_id, error=f"malformed stream ({exc})")

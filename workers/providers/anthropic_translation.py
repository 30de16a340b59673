"""Translation between a job (OpenAI's shapes) and Anthropic's Messages API, both ways.

Requests:

- ``system`` and ``developer`` messages become the ``system`` text; the other turns
  alternate ``user`` and ``assistant`` (consecutive turns of one role are merged, as
  Anthropic requires); a turn with no content (an assistant's ``""``) is left out, as
  Anthropic refuses it.
- Content parts become blocks: ``text``; ``image_url`` becomes an ``image`` block whose
  source is ``base64`` (from a ``data:`` URL) or ``url`` (http(s)); ``detail`` has no
  counterpart.
- An assistant's ``tool_calls`` become ``tool_use`` blocks (``input``: the arguments'
  JSON object); ``tool`` messages become ``tool_result`` blocks of a user turn, the
  results of one assistant turn together and first, as Anthropic requires.
- ``tools`` become Anthropic's (``name``, ``description``, ``input_schema``);
  ``tool_choice`` ``auto``/``none``/``required``/a named function becomes ``{type: auto |
  none | any | tool}``; ``parallel_tool_calls: false`` becomes
  ``disable_parallel_tool_use``; a function's ``strict`` is left out (Anthropic serves
  strict tool use on recent models only; the worker validates arguments). A
  conversation that carries tool calls but no ``tools`` declares the tools it names,
  with an open schema, and ``tool_choice: none`` (Anthropic refuses tool blocks in a
  request without tools).
- A JSON ``response_format`` becomes a forced tool (``answer_shape``): its
  ``input_schema`` is the schema (``json_object``: an open object) and its input comes
  back as the content, as JSON. Why a tool and not Anthropic's ``output_config.format``:
  tool use is served by every Claude model and every Anthropic-compatible endpoint,
  while constrained JSON output is served by recent models only, and refuses schemas with
  keywords it cannot enforce (``minimum``, ``maxLength``, ``additionalProperties`` other
  than false...) that OpenAI takes; the worker validates every JSON answer anyway.
- ``logprobs`` have no counterpart and are left out (the request side refuses them).

Answers: ``text`` blocks are the content, ``tool_use`` blocks the ``tool_calls``
(arguments: the input as a JSON string), the answer tool's input the JSON content;
``stop_reason`` ``end_turn``/``stop_sequence``/``pause_turn`` is ``stop``, ``max_tokens``
``length``, ``tool_use`` ``tool_calls``, ``refusal`` ``content_filter`` with the refusal.
``anthropic_stream.MessageStream`` folds a stream's events into the same message.

Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from jobs.chat import FinishReason, ImageURL, Message, NamedToolChoice, ToolCall
from jobs.models import Usage
from workers.providers.base import ProviderReply, ProviderRequest

#: What the answer tool of a ``json_object`` response format is called.
JSON_OBJECT_TOOL = "json_answer"
#: Anthropic's stop reasons in OpenAI's terms (``refusal`` is handled on its own).
STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls"}
_OPEN_OBJECT: dict[str, Any] = {"type": "object"}
_ANSWER_WORDS = "Give your whole answer by calling this tool: its input is the answer."


class TranslationError(ValueError):
    """Raised when a request cannot be said in Anthropic's terms (the message names the
    field)."""


@dataclass(frozen=True)
class AnswerShape:
    """The forced tool a JSON response format becomes, and how its input is read back."""

    #: The tool's name.
    name: str
    #: Whether the schema (not an object) is wrapped as the ``value`` of an object (its
    #: ``$schema`` and ``$defs`` stay at the root, where references find them).
    wrapped: bool = False

    def content(self, tool_input: Any, partial_json: str | None = None) -> str:
        """The answer's content: the tool's input as JSON (as streamed, when it was)."""
        if self.wrapped:
            value = tool_input.get("value") if isinstance(tool_input, dict) else tool_input
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if partial_json:
            return partial_json
        return json.dumps(tool_input, ensure_ascii=False, separators=(",", ":"))


def answer_shape(req: ProviderRequest) -> AnswerShape | None:
    """The forced tool of a request's JSON response format (None: text)."""
    fmt = req.response_format
    if fmt is None or not fmt.wants_json:
        return None
    taken = {t.function.name for t in req.tools or ()}
    name = fmt.json_schema.name if fmt.json_schema is not None else JSON_OBJECT_TOOL
    if name in taken:
        name = f"answer_{name}"[:64]
    schema = fmt.answer_schema
    return AnswerShape(name=name, wrapped=schema is not None and not _is_object(schema))


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (kind is None and "properties" in schema)


def _answer_tool(req: ProviderRequest, shape: AnswerShape) -> dict[str, Any]:
    fmt = req.response_format
    assert fmt is not None
    schema = fmt.answer_schema
    if schema is None:
        schema = {**_OPEN_OBJECT, "additionalProperties": True}
    elif shape.wrapped:
        defs: dict[str, Any] = {k: schema[k] for k in ("$schema", "$defs", "definitions")
                                if k in schema}
        inner = {k: v for k, v in schema.items() if k not in defs}
        schema = {**_OPEN_OBJECT, "properties": {"value": inner}, "required": ["value"],
                  **defs}
    described = fmt.json_schema.description if fmt.json_schema is not None else None
    return {"name": shape.name, "description": " ".join(filter(None, [described,
                                                                       _ANSWER_WORDS])),
            "input_schema": schema}


# --- messages ---------------------------------------------------------------------------

def image_block(image: ImageURL) -> dict[str, Any]:
    """An ``image_url`` part as an Anthropic image block."""
    if not image.url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": image.url}}
    head, _, data = image.url.partition(",")  # data:image/png;base64,<data> (validated)
    media_type = head.removeprefix("data:").split(";", 1)[0]
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": data}}


def _blocks(m: Message) -> list[dict[str, Any]]:
    """A message's content as blocks (empty text left out: Anthropic refuses it)."""
    if m.content is None:
        return [{"type": "text", "text": m.refusal}] if m.refusal else []
    if isinstance(m.content, str):
        return [{"type": "text", "text": m.content}] if m.content else []
    out: list[dict[str, Any]] = []
    for part in m.content:
        if part.image_url is not None:
            out.append(image_block(part.image_url))
        elif part.text:
            out.append({"type": "text", "text": part.text})
    return out


def _tool_use(call: ToolCall, where: str) -> dict[str, Any]:
    try:
        tool_input = json.loads(call.function.arguments or "{}")
    except ValueError as exc:
        raise TranslationError(f"{where}.function.arguments is not JSON ({exc}); Anthropic "
                               "takes a tool call's input as a JSON object") from exc
    if not isinstance(tool_input, dict):
        raise TranslationError(f"{where}.function.arguments is not a JSON object; "
                               "Anthropic takes a tool call's input as one")
    return {"type": "tool_use", "id": call.id, "name": call.function.name,
            "input": tool_input}


def _turn(m: Message, i: int) -> dict[str, Any]:
    """One non-system message as an Anthropic turn."""
    if m.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.tool_call_id}
        result["content"] = m.content if isinstance(m.content, str) else _blocks(m)
        return {"role": "user", "content": [result]}
    role = "assistant" if m.role == "assistant" else "user"
    uses = [_tool_use(c, f"messages.{i}.tool_calls.{j}")
            for j, c in enumerate(m.tool_calls or ())]
    if isinstance(m.content, str) and not uses:
        return {"role": role, "content": m.content}
    return {"role": role, "content": _blocks(m) + uses}


def _merge(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive turns of one role as one turn (their blocks in order)."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        if out and out[-1]["role"] == turn["role"]:
            out[-1] = {"role": turn["role"],
                       "content": _as_blocks(out[-1]["content"]) + _as_blocks(turn["content"])}
        else:
            out.append(turn)
    return out


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def split(req: ProviderRequest) -> tuple[str, list[dict[str, Any]]]:
    """The system text and the turns of a request, in Anthropic's shape."""
    if req.messages is None:
        return "", [{"role": "user", "content": req.prompt or ""}]
    system = "\n\n".join(m.text for m in req.messages if m.role in ("system", "developer"))
    turns = [_turn(m, i) for i, m in enumerate(req.messages)
             if m.role not in ("system", "developer")]
    # A turn that says nothing ('' or only empty parts) is left out: Anthropic refuses it
    # ("all messages must have non-empty content"), and its neighbours then merge.
    return system, _merge([t for t in turns if t["content"]]) or [{"role": "user",
                                                                   "content": ""}]


# --- tools ------------------------------------------------------------------------------

def _declared_tools(req: ProviderRequest) -> list[dict[str, Any]]:
    if req.tools:
        return [{"name": t.function.name,
                 **({"description": t.function.description} if t.function.description
                    else {}),
                 "input_schema": t.function.parameters or {**_OPEN_OBJECT, "properties": {}}}
                for t in req.tools]
    named = dict.fromkeys(c.function.name for m in req.messages or ()
                          for c in m.tool_calls or ())
    return [{"name": n, "input_schema": dict(_OPEN_OBJECT)} for n in named]


def _choice(req: ProviderRequest, shape: AnswerShape | None) -> tuple[dict[str, Any], bool]:
    """Anthropic's ``tool_choice``, and whether the answer tool is offered."""
    choice = req.tool_choice if req.tools else "none"  # tools the conversation names only
    if choice == "required":
        return {"type": "any"}, False
    if isinstance(choice, NamedToolChoice):
        return {"type": "tool", "name": choice.function.name}, False
    if shape is None:
        return {"type": "none" if choice == "none" else "auto"}, False
    if choice == "none":
        return {"type": "tool", "name": shape.name, "disable_parallel_tool_use": True}, True
    # auto: the answer is a call of one of the tools, or of the answer tool.
    return {"type": "any"}, True


def tool_fields(req: ProviderRequest, shape: AnswerShape | None) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` of a request (with the answer tool of a JSON response
    format); {} when it has none."""
    tools = _declared_tools(req)
    if not tools and shape is None:
        return {}
    picked, with_answer = _choice(req, shape)
    if with_answer and shape is not None:
        tools.append(_answer_tool(req, shape))
    if req.parallel_tool_calls is False and picked["type"] != "none":
        picked["disable_parallel_tool_use"] = True
    return {"tools": tools, "tool_choice": picked}


def to_anthropic(req: ProviderRequest, default_max_tokens: int) -> dict[str, Any]:
    """The ``/v1/messages`` body of a request (``system`` a string: cache marks are the
    provider's; without ``stream``). ``TranslationError`` when it cannot be said."""
    system, turns = split(req)
    body: dict[str, Any] = {"model": req.model,
                            "max_tokens": req.params.max_tokens or default_max_tokens}
    if system:
        body["system"] = system
    body["messages"] = turns
    p = req.params
    if p.temperature is not None:
        body["temperature"] = min(p.temperature, 1.0)
    if p.top_p is not None:
        body["top_p"] = p.top_p
    if p.stop:
        body["stop_sequences"] = p.stop
    body.update(tool_fields(req, answer_shape(req)))
    return body


# --- answers ------------------------------------------------------------------------------

def parse_usage(u: Any) -> Usage:
    """Anthropic's usage: every prompt token (cache reads and writes included), the cache
    reads as cached, the cache writes apart (billed at their own price)."""
    u = u if isinstance(u, dict) else {}
    read = int(u.get("cache_read_input_tokens") or 0)
    written = int(u.get("cache_creation_input_tokens") or 0)
    return Usage(prompt_tokens=int(u.get("input_tokens") or 0) + read + written,
                 completion_tokens=int(u.get("output_tokens") or 0), cached_tokens=read,
                 cache_write_tokens=written)


def _finish(stop: Any, calls: list[ToolCall], answered: bool) -> FinishReason | None:
    if calls:
        return "tool_calls"
    reason = STOP_REASONS.get(stop) if isinstance(stop, str) else None
    return "stop" if reason == "tool_calls" and answered else reason


def from_anthropic(job_id: str, data: Any, shape: AnswerShape | None,
                   raw: str = "") -> ProviderReply:
    """The reply for a Messages API answer (``shape``: the request's answer tool)."""
    try:
        texts: list[str] = []
        calls: list[ToolCall] = []
        answer: str | None = None
        for block in data["content"]:
            kind = block.get("type")
            if kind == "text":
                texts.append(block["text"])
            elif kind == "tool_use" and shape is not None and block["name"] == shape.name:
                answer = shape.content(block["input"], block.get("partial_json"))
            elif kind == "tool_use":
                calls.append(ToolCall.model_validate({
                    "id": block["id"], "type": "function", "function": {
                        "name": block["name"],
                        "arguments": json.dumps(block.get("input") or {},
                                                ensure_ascii=False)}}))
        stop = data.get("stop_reason")
        usage = parse_usage(data.get("usage"))
        text = answer if answer is not None else "".join(texts)
        if stop == "refusal":
            return ProviderReply(job_id=job_id, refusal=text or "The model declined to "
                                 "answer (stop_reason refusal).", finish_reason="content_filter",
                                 usage=usage)
        if not text and not calls:
            return ProviderReply(job_id=job_id, error=f"empty answer (stop_reason {stop!r}): "
                                 f"{raw}")
        return ProviderReply(job_id=job_id, text=text or None, tool_calls=tuple(calls) or None,
                             finish_reason=_finish(stop, calls, answer is not None),
                             usage=usage)
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
        return ProviderReply(job_id=job_id, error=f"malformed response ({exc!r}): {raw}")

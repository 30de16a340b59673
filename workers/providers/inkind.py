"""``echo`` and ``simulated`` answer in kind, deterministically (tests and the demo can
check what they get):

* with tools and a ``tool_choice`` other than ``none``: a call of the named function
  (``tool_choice`` names one), else of the first tool (``required``, or ``auto`` unless
  the last message is a tool result: then the answer is text, as a model's after using
  a tool). Its arguments are an instance of the tool's ``parameters``
  (``workers.providers.instances``); its id is ``call_`` and a digest of the request's
  text and the function; ``finish_reason`` is ``tool_calls`` and the content null;
* with a ``json_schema`` response format: JSON that validates against the schema; with
  ``json_object``: an instance of the JSON Schema the system (or developer) message
  gives, as a model would follow it (instructor's JSON mode writes the schema there),
  else ``{"answer": <the plain answer>}``;
* with no response format, when the last message is the user's asking for JSON in a
  ```` ```json ```` fenced block and the system (or developer) message gives a JSON
  Schema (instructor's MD_JSON mode): that block, holding an instance of the schema;
* else the provider's plain answer (``finish_reason`` ``stop``, or ``length`` when it was
  cut to ``max_tokens``).

Both count a prompt's tokens by one stated rule (``prompt_tokens``): its text
(``ProviderRequest.text``, where an image is an ``[image]`` mark) at four characters a
token, plus each image by its ``detail`` (``jobs.chat.image_tokens``: 85 low, 765 high or
auto), plus the tool definitions and a ``json_schema`` response format as the JSON text a
provider reads (four characters a token).

Text in an instance is drawn from the words of the user's messages (the prompt), so
answers differ per prompt. With ``logprobs`` asked, a plausible OpenAI ``logprobs``
object: one entry per piece of the content (a word with its leading space, or a JSON
token), each with a deterministic log probability and ``top_logprobs`` alternatives.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from jobs.chat import (
    CHARS_PER_TOKEN,
    FinishReason,
    FunctionCall,
    ToolCall,
    canonical,
    check_schema,
    image_tokens,
)
from workers.providers.base import ProviderRequest
from workers.providers.instances import instance

#: Pieces of content that logprobs are given for (their concatenation is the content).
_PIECES = re.compile(r"\s*[\w']+|\s*[^\w\s]|\s+")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the provider answers: content (None with tool calls), tool calls, why it
    stopped, log probabilities."""

    text: str | None
    tool_calls: tuple[ToolCall, ...] | None = None
    finish_reason: FinishReason = "stop"
    logprobs: dict[str, Any] | None = None
    #: Whether the answer is JSON or tool calls rather than the plain answer.
    shaped: bool = False

    @property
    def emitted(self) -> str:
        """The answer's text as the model would write it (content, or each tool call's
        name and arguments): what its tokens are counted from."""
        if self.tool_calls:
            return "".join(c.function.name + c.function.arguments for c in self.tool_calls)
        return self.text or ""


def prompt_tokens(req: ProviderRequest) -> int:
    """How many tokens the prompt counts for (the rule in the module docstring)."""
    shape = canonical(list(req.tools)) if req.tools else ""
    if req.response_format is not None and req.response_format.json_schema is not None:
        shape += canonical(req.response_format.json_schema)
    return ((len(req.text) + len(shape)) // CHARS_PER_TOKEN + 1
            + image_tokens(req.messages))


def user_text(req: ProviderRequest) -> str:
    """The words an answer is drawn from: the prompt, or the user messages' text."""
    if req.messages is None:
        return req.prompt or req.text
    return "\n".join(m.text for m in req.messages if m.role == "user") or req.text


def _tool_to_call(req: ProviderRequest) -> str | None:
    """The function the answer calls (None: it answers in text)."""
    if not req.tools or req.tool_choice == "none":
        return None
    if not isinstance(req.tool_choice, str | None):
        return req.tool_choice.function.name
    if req.tool_choice != "required" and req.messages and req.messages[-1].role == "tool":
        return None  # auto, after a tool result: the model answers
    return req.tools[0].function.name


def call_id(text: str, name: str) -> str:
    """A deterministic tool call id."""
    return "call_" + hashlib.sha256(f"{name}\x00{text}".encode()).hexdigest()[:24]


def answer(req: ProviderRequest, plain: str, *, cut: bool = False) -> Answer:
    """The answer in kind to ``req``; ``plain``: the provider's plain text answer (``cut``:
    it was cut to ``max_tokens``)."""
    name = _tool_to_call(req)
    words = user_text(req)
    if name is not None:
        tool = next(t for t in req.tools or () if t.function.name == name)
        args = instance(tool.function.parameters, words, seed=f"{name}\n{words}")
        call = ToolCall(id=call_id(req.text, name), function=FunctionCall(
            name=name, arguments=json.dumps(args, ensure_ascii=False)))
        return Answer(None, (call,), "tool_calls", _logprobs(req, None), shaped=True)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema":
        text = json.dumps(instance(fmt.answer_schema, words), ensure_ascii=False)
    elif fmt is not None and fmt.type == "json_object":
        schema = schema_in_system(req)
        value = instance(schema, words) if schema is not None else {"answer": plain}
        text = json.dumps(value, ensure_ascii=False)
    elif (schema := _fenced_ask(req)) is not None:
        value = instance(schema, _FENCE_ASK.sub("", words))
        text = f"```json\n{json.dumps(value, indent=2, ensure_ascii=False)}\n```"
    else:
        return Answer(plain, None, "length" if cut else "stop", _logprobs(req, plain))
    return Answer(text, None, "stop", _logprobs(req, text), shaped=True)


#: A request for JSON in a fenced block, as instructor's MD_JSON mode writes it ("Return
#: the correct JSON response within a ```json codeblock. not the JSON_SCHEMA"): the
#: sentence that asks.
_FENCE_ASK = re.compile(r"[^.\n]*```json[^\n]*", re.IGNORECASE)


def _fenced_ask(req: ProviderRequest) -> dict[str, Any] | None:
    """The schema to answer in a fenced JSON block: when the request has no response
    format, its last message is the user's asking for a ```json block, and the system
    (or developer) messages give a JSON Schema (``schema_in_system``); else None."""
    if req.response_format is not None or not req.messages:
        return None
    last = req.messages[-1]
    if last.role != "user" or not _FENCE_ASK.search(last.text):
        return None
    return schema_in_system(req)


def schema_in_system(req: ProviderRequest) -> dict[str, Any] | None:
    """The first JSON Schema of an object written in the system or developer messages
    (an object with ``properties`` that is a valid schema), or None."""
    text = "\n".join(m.text for m in req.messages or () if m.role in ("system", "developer"))
    decoder = json.JSONDecoder()
    at = text.find("{")
    for _ in range(64):  # a bounded search: the first objects only
        if at < 0:
            return None
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at = text.find("{", at + 1)
            continue
        if isinstance(value, dict) and isinstance(value.get("properties"), dict):
            try:
                return check_schema(value)
            except ValueError:
                pass
        at = text.find("{", end)
    return None


def _logprobs(req: ProviderRequest, text: str | None) -> dict[str, Any] | None:
    """OpenAI's ``choice.logprobs`` for ``text``, when the request asks for them."""
    if not req.params.logprobs:
        return None
    if text is None:
        return {"content": None, "refusal": None}
    top = req.params.top_logprobs or 0
    entries = []
    for i, piece in enumerate(_PIECES.findall(text)):
        digest = hashlib.blake2b(f"{i}\x00{piece}".encode(), digest_size=4).digest()
        logprob = -round(int.from_bytes(digest, "big") % 2000 / 1000, 4)
        alternatives = list(dict.fromkeys([piece, piece.upper(), piece.strip() or " ",
                                           piece + "s", *(f"{piece}{k}" for k in range(20))]))
        tops = [{"token": alt, "logprob": round(logprob - 1.5 * k, 4),
                 "bytes": list(alt.encode())} for k, alt in enumerate(alternatives[:top])]
        entries.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                        "top_logprobs": tops})
    return {"content": entries, "refusal": None}

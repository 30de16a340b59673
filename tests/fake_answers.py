"""What ``tests.fake_llm`` answers beyond text, in each API's own shape, and the rules of
Anthropic's Messages API it checks a request against.

Scripted actions (``server.script(marker, [action])``):

- ``tool_call``: OpenAI: ``content`` null, one call of the named ``tool_choice`` (else
  the first tool) with ``FakeLLM.tool_input`` as its arguments, ``finish_reason``
  ``tool_calls``. Anthropic: a ``text`` block and a ``tool_use`` block of that tool,
  ``stop_reason`` ``tool_use``.
- ``json``: OpenAI: ``FakeLLM.json_answer`` as the content. Anthropic: a ``tool_use`` of
  the forced tool with ``json_answer`` as its input.
- ``refusal``: OpenAI: ``content`` null and a ``refusal``. Anthropic: ``stop_reason``
  ``refusal`` with the text.

Streamed, each comes as the API streams it: tool call arguments and JSON in fragments.
A chat request with ``logprobs`` gets a ``logprobs`` object for its answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

REFUSAL = "I can't help with that."
LOGPROBS = {"content": [{"token": "re", "logprob": -0.25, "bytes": [114, 101],
                         "top_logprobs": [{"token": "re", "logprob": -0.25,
                                           "bytes": [114, 101]}]}], "refusal": None}
KINDS = ("tool_call", "json", "refusal")
_USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "prompt_tokens_details": {
    "cached_tokens": 8}}


def _halves(text: str) -> list[str]:
    mid = len(text) // 2
    return [text[:mid], text[mid:]]


# --- OpenAI ---------------------------------------------------------------------------

def _openai_tool(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str(choice["function"]["name"])
    return str(body["tools"][0]["function"]["name"])


def openai_message(kind: str, body: dict[str, Any], tool_input: dict[str, Any],
                   json_answer: Any) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason of a scripted chat answer."""
    if kind == "tool_call":
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": _openai_tool(body), "arguments": json.dumps(tool_input)}}]}, "tool_calls"
    if kind == "json":
        return {"role": "assistant", "content": json.dumps(json_answer)}, "stop"
    return {"role": "assistant", "content": None, "refusal": REFUSAL}, "stop"


def openai_answer(kind: str, body: dict[str, Any], tool_input: dict[str, Any],
                  json_answer: Any) -> dict[str, Any]:
    message, reason = openai_message(kind, body, tool_input, json_answer)
    return {"id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": reason,
                         "logprobs": LOGPROBS if body.get("logprobs") else None}],
            "usage": _USAGE}


def openai_chunks(kind: str, body: dict[str, Any], tool_input: dict[str, Any],
                  json_answer: Any) -> Iterator[dict[str, Any]]:
    """The chunks of a scripted streamed chat answer (usage last when asked)."""
    message, reason = openai_message(kind, body, tool_input, json_answer)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": None})
    if kind == "tool_call":
        call = message["tool_calls"][0]
        yield chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"],
                                                  "arguments": ""}}]})
        for part in _halves(call["function"]["arguments"]):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
    else:
        field = "content" if kind == "json" else "refusal"
        for part in _halves(message[field]):
            yield chunk({field: part})
    yield chunk({}, reason)
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {"id": "chatcmpl-1", "choices": [], "usage": _USAGE}


# --- Anthropic --------------------------------------------------------------------------

def _anthropic_tool(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "tool":
        return str(choice["name"])
    return str(body["tools"][0]["name"])


def anthropic_blocks(kind: str, body: dict[str, Any], tool_input: dict[str, Any],
                     json_answer: Any) -> tuple[list[dict[str, Any]], str]:
    """The content blocks and stop reason of a scripted Messages answer."""
    if kind == "refusal":
        return [{"type": "text", "text": REFUSAL}], "refusal"
    use = {"type": "tool_use", "id": "toolu_1", "name": _anthropic_tool(body),
           "input": json_answer if kind == "json" else tool_input}
    lead = [] if kind == "json" else [{"type": "text", "text": "Checking."}]
    return [*lead, use], "tool_use"


def anthropic_answer(kind: str, body: dict[str, Any], tool_input: dict[str, Any],
                     json_answer: Any) -> dict[str, Any]:
    blocks, stop = anthropic_blocks(kind, body, tool_input, json_answer)
    return {"id": "msg_1", "type": "message", "role": "assistant", "content": blocks,
            "stop_reason": stop, "usage": {"input_tokens": 10, "output_tokens": 3}}


def anthropic_events(kind: str, body: dict[str, Any], tool_input: dict[str, Any],
                     json_answer: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events of a scripted streamed Messages answer."""
    blocks, stop = anthropic_blocks(kind, body, tool_input, json_answer)
    yield "message_start", {"message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            yield "content_block_start", {"index": i, "content_block": {"type": "text",
                                                                        "text": ""}}
            for part in _halves(block["text"]):
                yield "content_block_delta", {"index": i, "delta": {"type": "text_delta",
                                                                    "text": part}}
        else:
            yield "content_block_start", {"index": i, "content_block": {**block, "input": {}}}
            for part in _halves(json.dumps(block["input"])):
                yield "content_block_delta", {"index": i, "delta": {
                    "type": "input_json_delta", "partial_json": part}}
        yield "content_block_stop", {"index": i}
    yield "message_delta", {"delta": {"stop_reason": stop}, "usage": {"output_tokens": 3}}
    yield "message_stop", {}


def anthropic_problems(body: dict[str, Any]) -> list[str]:
    """What Anthropic's Messages API would refuse in a request (400
    ``invalid_request_error``): roles that do not alternate, tool results that do not come
    first or answer no ``tool_use`` of the turn before, tool blocks without ``tools``, a
    forced tool that is not declared, empty text blocks, a turn with no content (but the
    last, an assistant's), image blocks of another shape."""
    problems: list[str] = []
    messages = body.get("messages") or []
    tools = {t.get("name") for t in body.get("tools") or ()}
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "tool" and choice.get("name") not in tools:
        problems.append(f"tool_choice.name: {choice.get('name')!r} is not a declared tool")
    previous_uses: set[str] = set()
    for i, m in enumerate(messages):
        if i and messages[i - 1]["role"] == m["role"]:
            problems.append(f"messages.{i}: roles must alternate between user and assistant")
        content = m["content"]
        if not content and not (i == len(messages) - 1 and m["role"] == "assistant"):
            problems.append(f"messages.{i}: all messages must have non-empty content except "
                            "for the optional final assistant message")
        blocks = content if isinstance(content, list) else []
        kinds = [b.get("type") for b in blocks]
        results = kinds.count("tool_result")
        if results and kinds[:results] != ["tool_result"] * results:
            problems.append(f"messages.{i}: tool_result blocks must come first")
        for j, b in enumerate(blocks):
            problems += _block_problems(f"messages.{i}.content.{j}", b, m["role"],
                                        previous_uses, tools)
        previous_uses = {b["id"] for b in blocks if b.get("type") == "tool_use"}
    return problems


def _block_problems(where: str, b: dict[str, Any], role: str, previous_uses: set[str],
                    tools: set[Any]) -> list[str]:
    kind = b.get("type")
    if kind == "text" and not b.get("text"):
        return [f"{where}: text content blocks must be non-empty"]
    if kind in ("tool_use", "tool_result") and not tools:
        return [f"{where}: requests which include tool_use or tool_result blocks must "
                "define tools"]
    if kind == "tool_result" and (role != "user" or b.get("tool_use_id") not in previous_uses):
        return [f"{where}: tool_result answers no tool_use of the previous turn"]
    if kind == "tool_use" and (role != "assistant" or not isinstance(b.get("input"), dict)):
        return [f"{where}: tool_use belongs to an assistant turn, with an object input"]
    if kind == "image":
        source = b.get("source") or {}
        ok = (source.get("type") == "base64" and {"media_type", "data"} <= source.keys()) or (
            source.get("type") == "url" and "url" in source)
        return [] if ok else [f"{where}: image source must be base64 or url"]
    return []

"""A job's answer in OpenAI's exact shape: the ``chat.completion`` object and the
``chat.completion.chunk`` stream, as the official SDK parses them (``.parse()`` gets its
model instance from the content, ``tool_calls`` are typed objects, the
``chat.completions.stream(...)`` helper assembles tool call deltas).

A message carries ``content`` (null when the answer is only tool calls), ``refusal``,
``tool_calls`` (``id``, ``type`` ``function``, ``function.name``, ``function.arguments``
as a JSON string) and ``annotations``; a choice its ``finish_reason`` (``stop``,
``length``, ``tool_calls``, ``content_filter``) and ``logprobs``. In a stream, content
comes as text deltas; each tool call as OpenAI streams it: a first delta with its
``index``, ``id``, ``type``, ``function.name`` and empty ``arguments``, then the arguments
in fragments; the last chunk has the ``finish_reason``.

Pure: dictionaries in, dictionaries out; the endpoint and the Batch API's output lines
serve them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from jobs import costs
from jobs.models import JobResult
from jobs.prices import PriceBook

#: Fragments tool call arguments are streamed in: JSON punctuation, strings, the rest.
_FRAGMENTS = re.compile(r'"(?:[^"\\]|\\.)*"?|[{}\[\]:,]|[^{}\[\]:,"]+')


def usage(res: JobResult) -> dict[str, Any]:
    """OpenAI's ``usage`` of a result (zeros when the provider gave none), with two fields
    of ours that the SDK keeps as extra attributes: ``cost_usd`` (what the job cost, null
    when no price is known) and ``saved_usd`` (what it did not pay: the cache, coalescing,
    prompt-cache reads, the batch discount)."""
    u = res.usage
    if u is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}, "cost_usd": None,
                "saved_usd": None}
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "cost_usd": u.cost_usd, "saved_usd": u.saved_usd}


def finish_reason(res: JobResult) -> str:
    """Why the answer stopped: the provider's word, else ``tool_calls`` or ``stop``."""
    return res.finish_reason or ("tool_calls" if res.tool_calls else "stop")


def tool_calls(res: JobResult) -> list[dict[str, Any]] | None:
    """The answer's tool calls as OpenAI sends them (None when there are none)."""
    if not res.tool_calls:
        return None
    return [{"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in res.tool_calls]


def message(res: JobResult) -> dict[str, Any]:
    """The assistant message of a result."""
    calls = tool_calls(res)
    content = res.text if res.text is not None or calls or res.refusal else ""
    out: dict[str, Any] = {"role": "assistant", "content": content, "refusal": res.refusal,
                           "annotations": []}
    if calls:
        out["tool_calls"] = calls
    return out


def completion(res: JobResult, model: str, created: int | None = None) -> dict[str, Any]:
    """The ``chat.completion`` object of a SUCCEEDED job (``model``: the name the caller
    asked by)."""
    choice = {"index": 0, "message": message(res), "finish_reason": finish_reason(res),
              "logprobs": res.logprobs}
    return {"id": f"chatcmpl-{res.id}", "object": "chat.completion",
            "created": int(created if created is not None else res.created_at
                           or res.finished_at),
            "model": model, "choices": [choice], "usage": usage(res),
            "service_tier": None, "system_fingerprint": None}


class ChunkStream:
    """The chunks of one streamed answer (``chat.completion.chunk``), each a dictionary
    to send as one server-sent event."""

    def __init__(self, job_id: str, model: str, created: int) -> None:
        self.base = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk",
                     "created": created, "model": model, "service_tier": None,
                     "system_fingerprint": None}

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self.base, "choices": [{"index": 0, "delta": delta,
                                          "finish_reason": finish, "logprobs": logprobs}]}

    def start(self) -> dict[str, Any]:
        """The first chunk: the role, and empty content."""
        return self.chunk({"role": "assistant", "content": "", "refusal": None})

    def content(self, text: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """A content delta."""
        return self.chunk({"content": text}, logprobs=logprobs)

    def rest(self, res: JobResult, *, content: bool) -> Iterator[dict[str, Any]]:
        """What follows the streamed content once the job is final: its content (when
        none was streamed, ``content``) with its logprobs (after streamed content, which
        comes as text alone, the logprobs of all of it in a chunk of empty content: a
        client joins the chunks' logprobs, as OpenAI sends them per chunk), refusal, tool
        call deltas, then the chunk with the finish reason."""
        if content and res.text:
            yield self.content(res.text, res.logprobs)
        elif not content and res.logprobs:
            yield self.content("", res.logprobs)
        if res.refusal:
            yield self.chunk({"refusal": res.refusal})
        for i, call in enumerate(tool_calls(res) or ()):
            yield self.chunk({"tool_calls": [{
                "index": i, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}]})
            for piece in _FRAGMENTS.findall(call["function"]["arguments"]):
                yield self.chunk({"tool_calls": [{"index": i,
                                                  "function": {"arguments": piece}}]})
        yield self.chunk({}, finish=finish_reason(res))

    def usage(self, res: JobResult) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {**self.base, "choices": [], "usage": usage(res)}


class TextChunkStream(ChunkStream):
    """The chunks of a streamed legacy completion (``text_completion``)."""

    def __init__(self, job_id: str, model: str, created: int) -> None:
        super().__init__(job_id, model, created)
        self.base.update(id=f"cmpl-{job_id}", object="text_completion")
        del self.base["service_tier"]

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self.base, "choices": [{"index": 0, "text": delta.get("content", ""),
                                          "finish_reason": finish, "logprobs": None}]}

    def start(self) -> dict[str, Any]:
        return self.chunk({})

    def rest(self, res: JobResult, *, content: bool) -> Iterator[dict[str, Any]]:
        if content and res.text:
            yield self.content(res.text)
        yield self.chunk({}, finish=finish_reason(res))


class BatchUsage:
    """A batch's usage as OpenAI's batch object carries it (``input_tokens`` with
    ``cached_tokens``, ``output_tokens``, ``total_tokens``), with what it cost and saved:
    ``cost_usd`` (null when no job had a price), ``saved_usd`` and ``saved_by_reason``
    (extra fields the SDK keeps as attributes of ``batch.usage``)."""

    def __init__(self, prices: PriceBook | None) -> None:
        self.prices = prices
        self.input = self.cached = self.output = 0
        self.cost: float | None = None
        self.saved: dict[str, float] = {}

    def add(self, result: JobResult) -> None:
        u = result.usage
        if u is None:
            return
        if result.cache is None:  # tokens of calls made
            self.input += u.prompt_tokens
            self.cached += u.cached_tokens
            self.output += u.completion_tokens
        got = costs.charge(result, self.prices)
        if got.cost is not None:
            self.cost = (self.cost or 0.0) + got.cost
        for reason, usd in got.saved.items():
            self.saved[reason] = self.saved.get(reason, 0.0) + usd

    def view(self) -> dict[str, Any]:
        return {"input_tokens": self.input, "input_tokens_details": {
                    "cached_tokens": self.cached},
                "output_tokens": self.output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input + self.output,
                "cost_usd": None if self.cost is None else round(self.cost, 6),
                "saved_usd": round(sum(self.saved.values()), 6),
                "saved_by_reason": {k: round(v, 6) for k, v in sorted(self.saved.items())}}

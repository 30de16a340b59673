"""A streamed Messages API answer (Anthropic's server-sent events), folded into the
message it streams, read back by ``anthropic_translation.from_anthropic``.

Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from workers.providers.anthropic_translation import AnswerShape, from_anthropic
from workers.providers.base import ProviderReply


@dataclass
class MessageStream:
    """A streamed answer (Anthropic's events) folded into the message it streams.

    ``add`` takes one event and returns the content it adds for the job's stream: text
    deltas, or, for a JSON response format, the answer tool's input as it arrives (text
    beside it is not the answer; held back, it goes out at the end when the answer tool
    was not called).
    """

    shape: AnswerShape | None = None
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None
    events: int = 0

    def add(self, event: str, data: dict[str, Any]) -> str:
        self.events += 1
        kind = data.get("type") or event
        if kind == "message_start":
            self._usage((data.get("message") or {}).get("usage"))
        elif kind == "content_block_start":
            block = dict(data["content_block"])
            if block.get("type") == "tool_use":
                block["partial_json"] = ""
            self.blocks[int(data["index"])] = block
        elif kind == "content_block_delta":
            return self._delta(int(data["index"]), data.get("delta") or {})
        elif kind == "content_block_stop":
            return self._stop(int(data["index"]))
        elif kind == "message_delta":
            self.stop_reason = (data.get("delta") or {}).get("stop_reason") or self.stop_reason
            self._usage(data.get("usage"))
        elif kind == "message_stop":
            return self._held_text()
        elif kind == "error":
            raise ValueError(f"the stream reported an error: {data.get('error')}")
        return ""

    def _held_text(self) -> str:
        """The text held back in a JSON answer, when the answer tool was not called."""
        if self.shape is None or any(self._is_answer(b) for b in self.blocks.values()):
            return ""
        return "".join(str(b.get("text", "")) for _, b in sorted(self.blocks.items())
                       if b.get("type") == "text")

    def _usage(self, u: Any) -> None:
        for k, v in (u or {}).items():
            if isinstance(v, int | float):
                self.usage[k] = int(v)

    def _is_answer(self, block: dict[str, Any]) -> bool:
        return self.shape is not None and block.get("name") == self.shape.name

    def _delta(self, index: int, delta: dict[str, Any]) -> str:
        block = self.blocks.setdefault(index, {"type": "text", "text": ""})
        if delta.get("type") == "text_delta":
            block["text"] = block.get("text", "") + delta["text"]
            return "" if self.shape is not None else str(delta["text"])
        if delta.get("type") == "input_json_delta":
            block["partial_json"] = block.get("partial_json", "") + delta["partial_json"]
            answer = self._is_answer(block) and self.shape is not None and not self.shape.wrapped
            return str(delta["partial_json"]) if answer else ""
        return ""

    def _stop(self, index: int) -> str:
        """A wrapped answer goes to the job's stream whole, once its input is complete."""
        block = self.blocks.get(index) or {}
        if self._is_answer(block) and self.shape is not None and self.shape.wrapped:
            return self.shape.content(json.loads(block.get("partial_json") or "{}"))
        return ""

    def message(self) -> dict[str, Any]:
        """The streamed message, as the API would have answered it whole (a tool call's
        input parsed from its fragments, which stay in ``partial_json``)."""
        content = []
        for _, block in sorted(self.blocks.items()):
            if block.get("type") == "tool_use":
                block = {**block, "input": json.loads(block.get("partial_json") or "{}")}
            content.append(block)
        return {"content": content, "stop_reason": self.stop_reason, "usage": self.usage}

    def reply(self, job_id: str) -> ProviderReply:
        """The reply for everything streamed."""
        try:
            message = self.message()
        except ValueError as exc:
            return ProviderReply(job_id=job_id, error=f"malformed stream: a tool call's "
                                 f"input is not JSON ({exc})")
        return from_anthropic(job_id, message, self.shape, f"{self.events} events streamed")

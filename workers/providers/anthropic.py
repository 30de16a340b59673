"""``anthropic``: the Messages API, with the batch's shared prefix marked for caching.

When every member of a batch has the same system prompt, or the same leading user
content, and it is at least ``anthropic_min_cache_tokens`` long, that prefix is sent as
its own block with ``cache_control: {"type": "ephemeral"}``: the first member writes the
cache, the others read it at a tenth of the price. Requests go out first-then-parallel
so that the first member's cache write lands before the others read. A job sent alone
is marked the same way when the scheduler says other pending jobs share its long
prefix (``pending_prefix_chars``): the jobs after it then read the cache it wrote.
The translation both ways (messages, images, tools, tool calls and results, JSON response
formats, stop reasons) is ``anthropic_translation``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from config.settings import Settings
from jobs.streams import Sink
from workers.providers.anthropic_stream import MessageStream
from workers.providers.anthropic_translation import (
    TranslationError,
    answer_shape,
    from_anthropic,
    to_anthropic,
)

__all__ = ["AnthropicProvider", "answer_shape", "from_anthropic"]
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.http import (
    Gate,
    Strategy,
    make_client,
    not_json,
    post,
    post_stream,
    run_ordered,
    shared_prefix,
)

CONTEXT_MARKERS = ("prompt is too long", "context length", "context window",
                   "too many tokens")
EPHEMERAL = {"type": "ephemeral"}


def lead_text(turn: dict[str, Any]) -> str:
    """The text a turn starts with ('' when it starts with another block)."""
    content = turn["content"]
    if isinstance(content, str):
        return content
    first = content[0] if content else {}
    return str(first.get("text", "")) if first.get("type") == "text" else ""


def mark_lead(turn: dict[str, Any], lead: str) -> dict[str, Any]:
    """The turn with its first ``len(lead)`` characters as a block marked for caching."""
    content = turn["content"]
    rest = content[1:] if isinstance(content, list) else []
    text = lead_text(turn)
    return {"role": turn["role"], "content": [
        {"type": "text", "text": lead, "cache_control": EPHEMERAL},
        {"type": "text", "text": text[len(lead):]}, *rest]}


class AnthropicProvider:
    """The Anthropic Messages API."""

    name = "anthropic"
    probe_first = True
    streams = True

    def __init__(self, settings: Settings, *, base_url: str | None = None,
                 api_key: str | None = None) -> None:
        self.settings = settings
        self.base_url = (base_url or settings.anthropic_base_url).rstrip("/")
        key = api_key if api_key is not None else settings.anthropic_api_key.get_secret_value()
        self._headers = {"x-api-key": key, "anthropic-version": settings.anthropic_version}
        self.client = make_client(settings)
        self.gate = Gate(settings.provider_concurrency)
        #: Where streaming jobs' chunks go (set by the worker).
        self.sink: Sink | None = None

    def payloads(self, requests: Sequence[ProviderRequest],
                 ) -> list[dict[str, Any] | TranslationError]:
        """The request bodies of a batch, its shared prefix marked for caching (the error
        for a request that cannot be said in Anthropic's terms)."""
        bodies: list[dict[str, Any] | TranslationError] = []
        for r in requests:
            try:
                bodies.append(to_anthropic(r, self.settings.anthropic_default_max_tokens))
            except TranslationError as exc:
                bodies.append(exc)
        good = [(r, b) for r, b in zip(requests, bodies, strict=True) if isinstance(b, dict)]
        if not good:
            return bodies
        min_chars = self.settings.anthropic_min_cache_tokens * 4
        cache_system, lead = self._cached_prefix([r for r, _ in good],
                                                 [b for _, b in good], min_chars)
        firsts = [lead_text(b["messages"][0]) for _, b in good]
        cache_lead = len(lead) >= min_chars and all(len(f) > len(lead) for f in firsts)
        for _, body in good:
            if cache_system and body.get("system"):
                body["system"] = [{"type": "text", "text": body["system"],
                                   "cache_control": EPHEMERAL}]
            if cache_lead:
                body["messages"][0] = mark_lead(body["messages"][0], lead)
        return bodies

    @staticmethod
    def _cached_prefix(requests: Sequence[ProviderRequest], bodies: list[dict[str, Any]],
                       min_chars: int) -> tuple[bool, str]:
        """Whether to mark the system prompt, and the leading user text to mark ('')."""
        systems = {str(b.get("system", "")) for b in bodies}
        system = next(iter(systems))
        if len(requests) > 1:
            if len(systems) == 1 and len(system) >= min_chars:
                return True, ""
            return False, shared_prefix([lead_text(b["messages"][0]) for b in bodies],
                                        1_000_000)
        # Alone: mark what other pending jobs share with it (the scheduler's hint).
        shared = requests[0].pending_prefix_chars
        if shared < min_chars:
            return False, ""
        if system:
            # The job's text starts "system: <system>\n": mark the system prompt when all
            # of it is shared.
            return len(system) >= min_chars and shared >= len("system: ") + len(system), ""
        first = lead_text(bodies[0]["messages"][0])
        return False, first[:shared] if requests[0].prompt is not None else ""

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        bodies = {r.job_id: b for r, b in zip(requests, self.payloads(requests), strict=True)}
        return run_ordered(requests, Strategy.WARM_THEN_PARALLEL,
                           self.settings.provider_concurrency,
                           lambda r: self._one(r, bodies[r.job_id]))

    def _one(self, req: ProviderRequest,
             body: dict[str, Any] | TranslationError) -> ProviderReply:
        if isinstance(body, TranslationError):
            return ProviderReply(job_id=req.job_id, error=f"not sent: {body}")
        if req.stream and self.sink is not None:
            return self._one_stream(req, body)
        resp = post(self.client, self.gate, f"{self.base_url}/v1/messages", body,
                    self._headers, self.settings, req.job_id, CONTEXT_MARKERS)
        if isinstance(resp, ProviderReply):
            return resp
        try:
            data = resp.json()
        except ValueError as exc:
            return not_json(req.job_id, resp, exc)
        return from_anthropic(req.job_id, data, answer_shape(req), resp.raw)

    def _one_stream(self, req: ProviderRequest, body: dict[str, Any]) -> ProviderReply:
        """One streamed request (Anthropic's events): each text delta (or, for a JSON
        response format, each fragment of the answer) goes to the sink as it arrives; the
        reply is the message the events built."""
        sink = self.sink
        assert sink is not None
        stream = MessageStream(shape=answer_shape(req))

        def on_data(event: str, data: Any) -> None:
            if not stream.events:
                sink.begin(req.job_id)
            added = stream.add(event, data)
            if added:
                sink.chunk(req.job_id, added)

        failed = post_stream(self.client, self.gate, f"{self.base_url}/v1/messages",
                             {**body, "stream": True}, self._headers, self.settings,
                             req.job_id, CONTEXT_MARKERS, on_data)
        return failed if failed is not None else stream.reply(req.job_id)

    def close(self) -> None:
        self.client.close()

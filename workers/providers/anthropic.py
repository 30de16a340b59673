"""``anthropic``: the Messages API, with the batch's shared prefix marked for caching.

When every member of a batch has the same system prompt, or the same leading user
content, and it is at least ``anthropic_min_cache_tokens`` long, that prefix is sent as
its own block with ``cache_control: {"type": "ephemeral"}``: the first member writes the
cache, the others read it at a tenth of the price. Requests go out first-then-parallel
so that the first member's cache write lands before the others read. A job sent alone
is marked the same way when the scheduler says other pending jobs share its long
prefix (``pending_prefix_chars``): the jobs after it then read the cache it wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from config.settings import Settings
from jobs.models import Usage
from jobs.streams import Sink
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


def _split(req: ProviderRequest) -> tuple[str, list[dict[str, str]]]:
    """System text and the user/assistant turns of a request."""
    if req.messages is None:
        return "", [{"role": "user", "content": req.prompt or ""}]
    system = "\n\n".join(m.text for m in req.messages if m.role in ("system", "developer"))
    turns = [{"role": "assistant" if m.role == "assistant" else "user", "content": m.text}
             for m in req.messages if m.role not in ("system", "developer")]
    return system, turns or [{"role": "user", "content": ""}]


def answer_shape(req: ProviderRequest) -> object | None:
    """How a request's answer is read back from Anthropic's message: as it is (its text
    blocks); None for every request here."""
    return None


def parse_usage(u: Any) -> Usage:
    """Anthropic's ``usage``: input counts uncached, cache reads and cache writes apart;
    ``prompt_tokens`` is their sum."""
    u = u if isinstance(u, dict) else {}
    read = int(u.get("cache_read_input_tokens") or 0)
    written = int(u.get("cache_creation_input_tokens") or 0)
    return Usage(prompt_tokens=int(u.get("input_tokens") or 0) + read + written,
                 completion_tokens=int(u.get("output_tokens") or 0), cached_tokens=read,
                 cache_write_tokens=written)


def from_anthropic(job_id: str, data: Any, shape: object | None = None,
                   raw: str = "") -> ProviderReply:
    """The reply for a Messages API answer's JSON (``raw``: its body, kept with an error):
    pure, shared by the live call and a line of Message Batches' results."""
    try:
        text = "".join(block["text"] for block in data["content"]
                       if block.get("type") == "text")
        if not text:
            reason = data.get("stop_reason")
            return ProviderReply(job_id=job_id, error=f"empty answer (stop_reason "
                                 f"{reason!r}): {raw}")
        return ProviderReply(job_id=job_id, text=text, usage=parse_usage(data.get("usage")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return ProviderReply(job_id=job_id, error=f"malformed response ({exc!r}): {raw}")


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

    def payloads(self, requests: Sequence[ProviderRequest]) -> list[dict[str, Any]]:
        """The request bodies of a batch, its shared prefix marked for caching."""
        parts = [_split(r) for r in requests]
        min_chars = self.settings.anthropic_min_cache_tokens * 4
        cache_system, lead = self._cached_prefix(requests, parts, min_chars)
        firsts = [t[0]["content"] for _, t in parts]
        cache_lead = len(lead) >= min_chars and all(len(f) > len(lead) for f in firsts)
        out = []
        for req, (system, turns) in zip(requests, parts, strict=True):
            body: dict[str, Any] = {
                "model": req.model,
                "max_tokens": req.params.max_tokens or self.settings.anthropic_default_max_tokens,
            }
            if system:
                body["system"] = ([{"type": "text", "text": system, "cache_control": EPHEMERAL}]
                                  if cache_system else system)
            messages: list[dict[str, Any]] = list(turns)
            if cache_lead:
                messages[0] = {"role": messages[0]["role"], "content": [
                    {"type": "text", "text": lead, "cache_control": EPHEMERAL},
                    {"type": "text", "text": messages[0]["content"][len(lead):]}]}
            body["messages"] = messages
            p = req.params
            if p.temperature is not None:
                body["temperature"] = min(p.temperature, 1.0)
            if p.top_p is not None:
                body["top_p"] = p.top_p
            if p.stop:
                body["stop_sequences"] = p.stop
            out.append(body)
        return out

    @staticmethod
    def _cached_prefix(requests: Sequence[ProviderRequest],
                       parts: list[tuple[str, list[dict[str, str]]]],
                       min_chars: int) -> tuple[bool, str]:
        """Whether to mark the system prompt, and the leading user text to mark ('')."""
        systems = {s for s, _ in parts}
        system = next(iter(systems))
        if len(requests) > 1:
            if len(systems) == 1 and len(system) >= min_chars:
                return True, ""
            return False, shared_prefix([t[0]["content"] for _, t in parts], 1_000_000)
        # Alone: mark what other pending jobs share with it (the scheduler's hint).
        shared = requests[0].pending_prefix_chars
        if shared < min_chars:
            return False, ""
        if system:
            # The job's text starts "system: <system>\n": mark the system prompt when all
            # of it is shared.
            return len(system) >= min_chars and shared >= len("system: ") + len(system), ""
        first = parts[0][1][0]["content"]
        return False, first[:shared] if requests[0].prompt is not None else ""

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        bodies = {r.job_id: b for r, b in zip(requests, self.payloads(requests), strict=True)}
        return run_ordered(requests, Strategy.WARM_THEN_PARALLEL,
                           self.settings.provider_concurrency,
                           lambda r: self._one(r, bodies[r.job_id]))

    def _one(self, req: ProviderRequest, body: dict[str, Any]) -> ProviderReply:
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
        """One streamed request (Anthropic's events): each text delta goes to the sink as
        it arrives; usage from ``message_start`` and ``message_delta``."""
        sink = self.sink
        assert sink is not None
        parts: list[str] = []
        usage: dict[str, int] = {}
        started: list[bool] = []

        def on_data(event: str, data: Any) -> None:
            kind = data.get("type") or event
            if not started:
                started.append(True)
                sink.begin(req.job_id)
            if kind == "message_start":
                for k, v in ((data.get("message") or {}).get("usage") or {}).items():
                    usage[k] = int(v or 0)
            elif kind == "content_block_delta":
                delta = data.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    parts.append(delta["text"])
                    sink.chunk(req.job_id, delta["text"])
            elif kind == "message_delta":
                for k, v in (data.get("usage") or {}).items():
                    usage[k] = int(v or 0)
            elif kind == "error":
                raise ValueError(f"the stream reported an error: {data.get('error')}")

        failed = post_stream(self.client, self.gate, f"{self.base_url}/v1/messages",
                             {**body, "stream": True}, self._headers, self.settings,
                             req.job_id, CONTEXT_MARKERS, on_data)
        if failed is not None:
            return failed
        if not parts:
            return ProviderReply(job_id=req.job_id, error="empty answer (no text streamed)")
        read = usage.get("cache_read_input_tokens", 0)
        written = usage.get("cache_creation_input_tokens", 0)
        return ProviderReply(job_id=req.job_id, text="".join(parts), usage=Usage(
            prompt_tokens=usage.get("input_tokens", 0) + read + written,
            completion_tokens=usage.get("output_tokens", 0), cached_tokens=read))

    def close(self) -> None:
        self.client.close()

"""``openai``: any OpenAI-compatible server (OpenAI, vLLM, SGLang, llama.cpp's server, Ollama).

Chat jobs go to ``/v1/chat/completions``, one request per job, sent by the prefix
strategy: ``sequential`` for servers whose slots each keep their own prompt cache
(llama.cpp: a prefix is reused only when the batch's members follow one another onto the
same slot), ``warm_then_parallel`` for servers with one shared prefix cache (vLLM,
SGLang, OpenAI: the first member warms it, the rest go out together), or ``auto``, which
asks the server (llama.cpp answers ``/props``). With ``openai_endpoint = completions``,
a batch's plain prompts go to ``/v1/completions`` as one list; the response's total
usage is then shared out over the jobs in proportion to their prompt length.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from config.settings import Settings
from jobs.models import Usage
from jobs.streams import Sink
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.http import (
    Gate,
    Strategy,
    cache_key,
    make_client,
    not_json,
    post,
    post_stream,
    run_ordered,
)

log = logging.getLogger(__name__)

CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context length",
                   "context window", "exceeds the available context", "too many tokens")
_PARAMS = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty",
           "frequency_penalty")


class OpenAIProvider:
    """An OpenAI-compatible HTTP server."""

    name = "openai"
    probe_first = True
    streams = True

    def __init__(self, settings: Settings, *, base_url: str | None = None,
                 api_key: str | None = None) -> None:
        self.settings = settings
        self.base_url = (base_url or settings.openai_base_url).rstrip("/")
        key = api_key if api_key is not None else settings.openai_api_key.get_secret_value()
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = make_client(settings)
        self.gate = Gate(settings.provider_concurrency)
        #: Where streaming jobs' chunks go (set by the worker).
        self.sink: Sink | None = None
        self._strategy: Strategy | None = (
            None if settings.openai_prefix_strategy == "auto"
            else Strategy(settings.openai_prefix_strategy))

    @property
    def strategy(self) -> Strategy:
        """The prefix strategy (``auto`` asks the server once)."""
        if self._strategy is None:
            self._strategy = self._probe()
        return self._strategy

    def _probe(self) -> Strategy:
        root = self.base_url.removesuffix("/v1")
        try:
            resp = self.client.get(f"{root}/props", headers=self._headers, timeout=5.0)
            if resp.status_code == 200 and "total_slots" in resp.json():
                log.info("openai: %s is a llama.cpp server: sending batches sequentially", root)
                return Strategy.SEQUENTIAL
        except (httpx.HTTPError, ValueError):
            pass
        return Strategy.WARM_THEN_PARALLEL

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        texts = [r.text for r in requests]
        key = (cache_key(texts, requests[0].pending_prefix_chars)
               if self.settings.openai_prompt_cache_key and requests else None)
        if self.settings.openai_endpoint == "completions" and all(
                r.prompt is not None for r in requests):
            return self._completions(requests, key)
        return run_ordered(requests, self.strategy, self.settings.provider_concurrency,
                           lambda r: self._chat(r, key))

    def _chat(self, req: ProviderRequest, key: str | None) -> ProviderReply:
        payload = to_openai(req, key)
        if req.stream and self.sink is not None:
            return self._chat_stream(req, payload)
        resp = post(self.client, self.gate, f"{self.base_url}/chat/completions", payload,
                    self._headers, self.settings, req.job_id, CONTEXT_MARKERS)
        if isinstance(resp, ProviderReply):
            return resp
        try:
            data = resp.json()
        except ValueError as exc:
            return not_json(req.job_id, resp, exc)
        return from_openai(req.job_id, data, resp.raw)

    def _chat_stream(self, req: ProviderRequest, payload: dict[str, Any]) -> ProviderReply:
        """One streamed chat request: each delta goes to the sink as it arrives; the reply
        is their concatenation, with the usage of the last chunk."""
        sink = self.sink
        assert sink is not None
        parts: list[str] = []
        usage: list[Usage] = []

        def on_data(_: str, chunk: Any) -> None:
            if not parts and not usage:
                sink.begin(req.job_id)
            found = parse_usage(chunk)
            if found is not None:
                usage.append(found)
            for choice in chunk.get("choices") or ():
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    parts.append(delta)
                    sink.chunk(req.job_id, delta)

        failed = post_stream(self.client, self.gate, f"{self.base_url}/chat/completions",
                             {**payload, "stream": True,
                              "stream_options": {"include_usage": True}},
                             self._headers, self.settings, req.job_id, CONTEXT_MARKERS,
                             on_data)
        if failed is not None:
            return failed
        if not parts:
            return ProviderReply(job_id=req.job_id, error="empty answer (no content streamed)")
        return ProviderReply(job_id=req.job_id, text="".join(parts),
                             usage=usage[-1] if usage else None)

    def _completions(self, requests: Sequence[ProviderRequest],
                     key: str | None) -> list[ProviderReply]:
        first = requests[0]
        payload: dict[str, Any] = {"model": first.model, "prompt": [r.prompt for r in requests],
                                   **params(first)}
        if key:
            payload["prompt_cache_key"] = key
        resp = post(self.client, self.gate, f"{self.base_url}/completions", payload,
                    self._headers, self.settings, first.job_id, CONTEXT_MARKERS)
        if isinstance(resp, ProviderReply):  # the one request failed: so did every prompt
            # A refusal of a list is not any one prompt's error: the retry layer splits
            # the list until the culprit is alone (then the error is its own).
            shared = not resp.transient and len(requests) > 1
            return [dataclasses.replace(resp, job_id=r.job_id, whole_request=shared)
                    for r in requests]
        try:
            data = resp.json()
        except ValueError as exc:
            return [not_json(r.job_id, resp, exc) for r in requests]
        try:
            texts = {int(c["index"]): c["text"] for c in data["choices"]}
            total = parse_usage(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return [ProviderReply(job_id=r.job_id, error=f"malformed response ({exc!r}): "
                                  f"{resp.raw}", whole_request=len(requests) > 1)
                    for r in requests]
        weights = [len(r.text) + 1 for r in requests]
        out = []
        for i, req in enumerate(requests):
            text = texts.get(i)
            if not isinstance(text, str) or not text:
                out.append(ProviderReply(job_id=req.job_id,
                                         error=f"no answer for prompt {i}: {resp.raw}"))
                continue
            share = weights[i] / sum(weights)
            usage = None if total is None else Usage(
                prompt_tokens=round(total.prompt_tokens * share),
                completion_tokens=round(total.completion_tokens / len(requests)),
                cached_tokens=round(total.cached_tokens * share))
            out.append(ProviderReply(job_id=req.job_id, text=text, usage=usage))
        return out

    def close(self) -> None:
        self.client.close()


def params(req: ProviderRequest) -> dict[str, Any]:
    """The request's generation parameters that are set."""
    p = req.params.model_dump(exclude_none=True)
    return {k: p[k] for k in _PARAMS if k in p}


def to_openai(req: ProviderRequest, cache_key: str | None = None) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body of a request (without ``stream``): pure, shared by
    the live call and a line of the Batch API."""
    messages = ([m.payload() for m in req.messages]
                if req.messages is not None else [{"role": "user", "content": req.prompt}])
    body: dict[str, Any] = {"model": req.model, "messages": messages, **params(req)}
    if cache_key:
        body["prompt_cache_key"] = cache_key
    return body


def from_openai(job_id: str, data: Any, raw: str = "") -> ProviderReply:
    """The reply for a ``/v1/chat/completions`` answer's JSON (``raw``: its body, kept with
    an error): pure, shared by the live call and a line of the Batch API's output."""
    try:
        choices = data["choices"]
        if not choices:
            return ProviderReply(job_id=job_id, error=f"no answer (empty choices): {raw}")
        text = choices[0]["message"]["content"]
        if not isinstance(text, str) or not text:
            reason = choices[0].get("finish_reason")
            why = "the content filter withheld it" if reason == "content_filter" else (
                f"finish_reason {reason!r}" if reason else "no content")
            return ProviderReply(job_id=job_id, error=f"empty answer ({why}): {raw}")
        return ProviderReply(job_id=job_id, text=text, usage=parse_usage(data))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        return ProviderReply(job_id=job_id, error=f"malformed response ({exc!r}): {raw}")


def parse_usage(data: dict[str, Any]) -> Usage | None:
    """OpenAI's ``usage``, with ``prompt_tokens_details.cached_tokens`` (None if absent)."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    return Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                 completion_tokens=int(usage.get("completion_tokens") or 0),
                 cached_tokens=int(details.get("cached_tokens") or 0))

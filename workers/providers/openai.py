"""``openai``: any OpenAI-compatible server (OpenAI, vLLM, SGLang, llama.cpp's server, Ollama).

Chat jobs go to ``/v1/chat/completions``, one request per job, sent by the prefix
strategy: ``sequential`` for servers whose slots each keep their own prompt cache
(llama.cpp: a prefix is reused only when the batch's members follow one another onto the
same slot), ``warm_then_parallel`` for servers with one shared prefix cache (vLLM,
SGLang, OpenAI: the first member warms it, the rest go out together), or ``auto``, which
asks the server (llama.cpp answers ``/props``). With ``openai_endpoint = completions``,
a batch's plain prompts go to ``/v1/completions`` as one list; the response's total
usage is then shared out over the jobs in proportion to their prompt length. A batch
with any job that needs chat (messages, a JSON response format, tools, logprobs) goes to
``/v1/chat/completions``. The translation both ways is ``openai_translation``'s.
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
from workers.providers.openai_translation import (
    COMPLETION_PARAMS,
    ChatStream,
    finish_reason,
    from_openai,
    needs_chat,
    params,
    parse_usage,
    to_openai,
)

log = logging.getLogger(__name__)

CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context length",
                   "context window", "exceeds the available context", "too many tokens")


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
        if self.settings.openai_endpoint == "completions" and not any(
                needs_chat(r) for r in requests):
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
        """One streamed chat request: each content delta goes to the sink as it arrives;
        the reply folds every chunk (content, tool call deltas, refusal, finish reason,
        the usage of the last chunk)."""
        sink = self.sink
        assert sink is not None
        stream = ChatStream()

        def on_data(_: str, chunk: Any) -> None:
            if not stream.chunks:
                sink.begin(req.job_id)
            added = stream.add(chunk)
            if added:
                sink.chunk(req.job_id, added)

        failed = post_stream(self.client, self.gate, f"{self.base_url}/chat/completions",
                             {**payload, "stream": True,
                              "stream_options": {"include_usage": True}},
                             self._headers, self.settings, req.job_id, CONTEXT_MARKERS,
                             on_data)
        return failed if failed is not None else stream.reply(req.job_id)

    def _completions(self, requests: Sequence[ProviderRequest],
                     key: str | None) -> list[ProviderReply]:
        first = requests[0]
        payload: dict[str, Any] = {"model": first.model, "prompt": [r.prompt for r in requests],
                                   **params(first, COMPLETION_PARAMS)}
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
            reasons = {int(c["index"]): finish_reason(c.get("finish_reason"))
                       for c in data["choices"]}
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
            out.append(ProviderReply(job_id=req.job_id, text=text, usage=usage,
                                     finish_reason=reasons.get(i)))
        return out

    def close(self) -> None:
        self.client.close()


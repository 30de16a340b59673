"""``simulated``: a documented cost model of a prefix-caching inference server.

The model, with its settings (``PROMPTBATCH_SIMULATED_*``):

* A prompt is cut into tokens of about four characters, and tokens into blocks of
  ``BLOCK_TOKENS``. Each block is identified by a hash chained over all blocks before it,
  as vLLM's automatic prefix cache does, so a block is reusable only after the same
  prefix.
* The server keeps an LRU cache of ``cache_tokens`` tokens of blocks. A request's leading
  blocks found in the cache are ``cached_tokens``; the rest are computed (prefill) and
  then cached.
* One call costs ``call_overhead_ms`` + ``prefill_us_per_token`` per uncached prompt
  token (requests prefill one after another, in the order of the batch) + decode: the
  requests decode in groups of ``decode_group``, each group taking ``decode_ms_per_step``
  per token of its longest answer.
* At most ``concurrency`` calls run at once in one worker process; the modelled server
  and its cache live in each worker process.
* Every modelled duration is multiplied by ``time_scale`` and really slept.
* A job submitted with ``stream`` gets its answer in pieces as it is decoded: one piece
  per decode step of its group (the answer's text cut into ``max_tokens`` pieces), after
  the call's overhead and prefill; the call lasts as long as without streaming.

Answers have ``max_tokens`` tokens (32 when unset, at most 256). Usage is reported as
OpenAI does: ``prompt_tokens``, ``completion_tokens``,
``prompt_tokens_details.cached_tokens`` (here ``Usage.cached_tokens``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.settings import Settings
from jobs.models import Usage
from workers.providers.base import ProviderReply, ProviderRequest

if TYPE_CHECKING:
    from jobs.streams import Sink

#: Tokens per cache block.
BLOCK_TOKENS = 16
#: Characters per token.
CHARS_PER_TOKEN = 4
DEFAULT_ANSWER_TOKENS = 32
MAX_ANSWER_TOKENS = 256


@dataclass(frozen=True, slots=True)
class CostModel:
    """The parameters of the modelled server."""

    call_overhead_s: float = 0.040
    prefill_s_per_token: float = 120e-6
    decode_s_per_step: float = 0.004
    decode_group: int = 8
    cache_tokens: int = 200_000
    concurrency: int = 4
    time_scale: float = 1.0

    @classmethod
    def from_settings(cls, s: Settings) -> CostModel:
        """The cost model configured by ``PROMPTBATCH_SIMULATED_*``."""
        return cls(call_overhead_s=s.simulated_call_overhead_ms / 1000,
                   prefill_s_per_token=s.simulated_prefill_us_per_token / 1e6,
                   decode_s_per_step=s.simulated_decode_ms_per_step / 1000,
                   decode_group=s.simulated_decode_group,
                   cache_tokens=s.simulated_cache_tokens,
                   concurrency=s.simulated_concurrency,
                   time_scale=s.simulated_time_scale)


def block_hashes(text: str) -> list[int]:
    """Chained hashes of the text's full blocks."""
    size = BLOCK_TOKENS * CHARS_PER_TOKEN
    out: list[int] = []
    h = 0
    for start in range(0, len(text) - size + 1, size):
        h = hash((h, text[start:start + size]))
        out.append(h)
    return out


class PrefixCache:
    """An LRU cache of prompt blocks."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = capacity_tokens // BLOCK_TOKENS
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def lookup_and_fill(self, hashes: Sequence[int]) -> int:
        """Blocks of the prefix already cached; then cache (and touch) all of them."""
        hits = 0
        for h in hashes:
            if h in self.blocks:
                hits += 1
                self.blocks.move_to_end(h)
            else:
                break
        for h in hashes[hits:]:
            self.blocks[h] = None
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return hits


def answer_tokens(req: ProviderRequest) -> int:
    """How many tokens the modelled server answers."""
    return min(req.params.max_tokens or DEFAULT_ANSWER_TOKENS, MAX_ANSWER_TOKENS)


def answer_text(req: ProviderRequest) -> str:
    """The modelled server's answer."""
    return f"[{req.model}] answer to: {req.text[:60]}"


def pieces(text: str, n: int) -> list[str]:
    """``text`` cut into ``n`` pieces of near-equal length, in order (some empty when the
    text is shorter than ``n``)."""
    return [text[len(text) * i // n:len(text) * (i + 1) // n] for i in range(n)]


class SimulatedProvider:
    """The cost model above, as a provider."""

    name = "simulated"
    probe_first = False
    streams = True

    def __init__(self, model: CostModel | None = None) -> None:
        self.model = model or CostModel()
        self.cache = PrefixCache(self.model.cache_tokens)
        self._slots = threading.BoundedSemaphore(self.model.concurrency)
        self._lock = threading.Lock()
        #: Where streaming jobs' pieces go (set by the worker).
        self.sink: Sink | None = None

    def cost(self, requests: Sequence[ProviderRequest]) -> tuple[float, list[Usage]]:
        """Modelled seconds of one call, and the usage of each request (fills the cache)."""
        m = self.model
        seconds = m.call_overhead_s
        usages: list[Usage] = []
        with self._lock:
            for req in requests:
                prompt_tokens = len(req.text) // CHARS_PER_TOKEN + 1
                cached = min(prompt_tokens,
                             self.cache.lookup_and_fill(block_hashes(req.text)) * BLOCK_TOKENS)
                seconds += (prompt_tokens - cached) * m.prefill_s_per_token
                usages.append(Usage(prompt_tokens=prompt_tokens,
                                    completion_tokens=answer_tokens(req), cached_tokens=cached))
        return seconds + self.decode_s(requests), usages

    def groups(self, requests: Sequence[ProviderRequest]) -> list[Sequence[ProviderRequest]]:
        """The decode groups of a call, in the order they decode."""
        size = self.model.decode_group
        return [requests[start:start + size] for start in range(0, len(requests), size)]

    def decode_s(self, requests: Sequence[ProviderRequest]) -> float:
        """Modelled seconds of a call's decode: each group, one after another, as many
        steps as its longest answer."""
        return sum(max(answer_tokens(r) for r in group) * self.model.decode_s_per_step
                   for group in self.groups(requests))

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        with self._slots:
            seconds, usages = self.cost(requests)
            if self.sink is not None and any(r.stream for r in requests):
                self._stream(requests, seconds, self.sink)
            elif self.model.time_scale > 0:
                time.sleep(seconds * self.model.time_scale)
        return [ProviderReply(job_id=r.job_id, usage=u, text=answer_text(r))
                for r, u in zip(requests, usages, strict=True)]

    def _stream(self, requests: Sequence[ProviderRequest], seconds: float,
                sink: Sink) -> None:
        """Sleep through the call as modelled, writing each streaming job's pieces as
        its group decodes them."""
        scale = self.model.time_scale
        step_s = self.model.decode_s_per_step * scale
        if scale > 0:  # the call's overhead and prefill
            time.sleep(max(0.0, seconds - self.decode_s(requests)) * scale)
        for req in requests:
            if req.stream:
                sink.begin(req.job_id)
        for group in self.groups(requests):
            parts = {r.job_id: pieces(answer_text(r), answer_tokens(r))
                     for r in group if r.stream}
            for step in range(max(answer_tokens(r) for r in group)):
                if step_s > 0:
                    time.sleep(step_s)
                for job_id, texts in parts.items():
                    if step < len(texts):
                        sink.chunk(job_id, texts[step])

    def close(self) -> None:
        return None

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
* A job submitted with ``stream`` gets its answer's text in pieces as it is decoded: one
  piece per decode step of its group, after the call's overhead and prefill; the call
  lasts as long as without streaming (tool calls come whole with the result).
* A share ``invalid_rate`` of the answers in JSON (below) is cut in half, as a model
  without constrained decoding may answer: drawn from a digest of the request's text, so
  the same request is cut again and one asked again (a longer conversation) draws anew.

Tokens are counted by one stated rule, the one ``echo`` counts by too
(``workers.providers.inkind.prompt_tokens``): the prompt's text at four characters a
token, plus each image by its ``detail`` (``jobs.chat.image_tokens``: 85 low, 765 high or
auto), plus the tool definitions and a ``json_schema`` response format as text (their
JSON, four characters a token). Only the text goes through the prefix cache. A plain
answer has ``max_tokens`` tokens (32 when unset, at most 256); an answer in kind (JSON
for a response format, or tool calls: ``workers.providers.inkind``) has the tokens of
what it writes (its JSON, or each call's function name and arguments), four characters
a token. Usage is reported as OpenAI does: ``prompt_tokens``, ``completion_tokens``,
``prompt_tokens_details.cached_tokens`` (here ``Usage.cached_tokens``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.settings import Settings
from jobs.models import Usage
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.inkind import Answer, answer, prompt_tokens

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
    invalid_rate: float = 0.0

    @classmethod
    def from_settings(cls, s: Settings) -> CostModel:
        """The cost model configured by ``PROMPTBATCH_SIMULATED_*``."""
        return cls(call_overhead_s=s.simulated_call_overhead_ms / 1000,
                   prefill_s_per_token=s.simulated_prefill_us_per_token / 1e6,
                   decode_s_per_step=s.simulated_decode_ms_per_step / 1000,
                   decode_group=s.simulated_decode_group,
                   cache_tokens=s.simulated_cache_tokens,
                   concurrency=s.simulated_concurrency,
                   time_scale=s.simulated_time_scale,
                   invalid_rate=s.simulated_invalid_rate)


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


def answer_tokens(req: ProviderRequest, said: Answer | None = None) -> int:
    """How many tokens the modelled server answers (see the module docstring)."""
    if said is not None and said.shaped:
        return len(said.emitted) // CHARS_PER_TOKEN + 1
    return min(req.params.max_tokens or DEFAULT_ANSWER_TOKENS, MAX_ANSWER_TOKENS)


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

    def cost(self, requests: Sequence[ProviderRequest],
             answers: Sequence[Answer] | None = None) -> tuple[float, list[Usage]]:
        """Modelled seconds of one call, and the usage of each request (fills the cache);
        ``answers``: what each request is answered (else a plain answer)."""
        m = self.model
        seconds = m.call_overhead_s
        usages: list[Usage] = []
        said: Sequence[Answer | None] = answers or [None] * len(requests)
        with self._lock:
            for req, ans in zip(requests, said, strict=True):
                tokens = prompt_tokens(req)
                cached = min(tokens,
                             self.cache.lookup_and_fill(block_hashes(req.text)) * BLOCK_TOKENS)
                seconds += (tokens - cached) * m.prefill_s_per_token
                usages.append(Usage(prompt_tokens=tokens, completion_tokens=answer_tokens(
                    req, ans), cached_tokens=cached))
        return seconds + self.decode_s(usages), usages

    def groups(self, n: int) -> list[range]:
        """The decode groups of a call of ``n`` requests (their positions), in the order
        they decode."""
        size = self.model.decode_group
        return [range(start, min(n, start + size)) for start in range(0, n, size)]

    def decode_s(self, usages: Sequence[Usage]) -> float:
        """Modelled seconds of a call's decode: each group, one after another, as many
        steps as its longest answer."""
        return sum(max(usages[i].completion_tokens for i in group)
                   for group in self.groups(len(usages))) * self.model.decode_s_per_step

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        answers = [self._maybe_cut(r, answer(r, f"[{r.model}] answer to: {r.text[:60]}"))
                   for r in requests]
        with self._slots:
            seconds, usages = self.cost(requests, answers)
            if self.sink is not None and any(r.stream for r in requests):
                self._stream(requests, answers, usages, seconds, self.sink)
            elif self.model.time_scale > 0:
                time.sleep(seconds * self.model.time_scale)
        return [ProviderReply(job_id=r.job_id, usage=u, text=a.text, tool_calls=a.tool_calls,
                              finish_reason=a.finish_reason, logprobs=a.logprobs)
                for r, u, a in zip(requests, usages, answers, strict=True)]

    def _stream(self, requests: Sequence[ProviderRequest], answers: Sequence[Answer],
                usages: Sequence[Usage], seconds: float, sink: Sink) -> None:
        """Sleep through the call as modelled, writing each streaming job's text in pieces
        as its group decodes them."""
        scale = self.model.time_scale
        step_s = self.model.decode_s_per_step * scale
        if scale > 0:  # the call's overhead and prefill
            time.sleep(max(0.0, seconds - self.decode_s(usages)) * scale)
        for req in requests:
            if req.stream:
                sink.begin(req.job_id)
        for group in self.groups(len(requests)):
            parts = {requests[i].job_id: pieces(answers[i].text or "",
                                                usages[i].completion_tokens)
                     for i in group if requests[i].stream}
            for step in range(max(usages[i].completion_tokens for i in group)):
                if step_s > 0:
                    time.sleep(step_s)
                for job_id, texts in parts.items():
                    if step < len(texts) and texts[step]:
                        sink.chunk(job_id, texts[step])

    def _maybe_cut(self, req: ProviderRequest, said: Answer) -> Answer:
        """The answer, or its JSON cut in half (``invalid_rate``)."""
        if not said.shaped or self.model.invalid_rate <= 0:
            return said
        digest = hashlib.blake2b(req.text.encode(), digest_size=8).digest()
        if int.from_bytes(digest, "big") / 2 ** 64 >= self.model.invalid_rate:
            return said
        calls = tuple(c.model_copy(update={"function": c.function.model_copy(update={
            "arguments": c.function.arguments[:len(c.function.arguments) // 2]})})
            for c in said.tool_calls or ())
        return dataclasses.replace(
            said, text=said.text[:len(said.text) // 2] if said.text else said.text,
            tool_calls=calls or None)

    def close(self) -> None:
        return None

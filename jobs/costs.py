"""What a job cost and what it saved, from the provider's own token counts and the
deployment's price (``jobs.prices``); and what a job is expected to cost at most, for
budgets. Pure.

A job's own call costs its uncached prompt tokens at the input price, its prompt-cache
reads at the cached price, its prompt-cache writes at the cache-write price and its
output at the output price; through the provider's batch endpoint (``lane ==
'provider_batch'``) all of that times the batch discount. What it saved, by reason:

* ``prefix_cache``: its cache reads at the input price less what they cost;
* ``batch_discount``: the part of the price the batch endpoint did not charge;
* ``exact_cache``, ``semantic_cache``, ``coalesced``: a job answered without a call of its
  own costs 0 and saved what its own call would have cost, its source's tokens at the fast
  lane's price (``hit_usage``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.chat import CHARS_PER_TOKEN, extra_tokens
from jobs.models import JobResult, JobSpec, Usage
from jobs.prices import Price, PriceBook

#: Why money was not spent (the label of ``promptbatch_saved_usd_total``).
REASONS = ("exact_cache", "coalesced", "semantic_cache", "prefix_cache", "batch_discount")
#: The saving reason of each way the cache answers (``JobResult.cache``).
HIT_REASONS = {"exact": "exact_cache", "coalesced": "coalesced", "semantic": "semantic_cache"}
#: Tokens per unit of a price.
PER = 1_000_000.0


@dataclass(frozen=True, slots=True)
class Charge:
    """What one job cost (None: no price known) and what it saved, by reason."""

    cost: float | None
    saved: dict[str, float] = field(default_factory=dict)

    @property
    def saved_total(self) -> float | None:
        """Everything saved (None when the cost is unknown and nothing was saved)."""
        if self.cost is None and not self.saved:
            return None
        return sum(self.saved.values())


def call_charge(usage: Usage, price: Price, *, batch: bool = False) -> Charge:
    """The charge of one call with ``usage`` at ``price`` (``batch``: through the
    provider's batch endpoint)."""
    prompt = max(0, usage.prompt_tokens)
    cached = min(max(0, usage.cached_tokens), prompt)
    written = min(max(0, usage.cache_write_tokens), prompt - cached)
    r = price.rates_for(prompt)
    full = ((prompt - cached - written) * r.input + cached * r.cached_input
            + written * r.cache_write + max(0, usage.completion_tokens) * r.output) / PER
    prefix = cached * max(0.0, r.input - r.cached_input) / PER
    paid = price.batch_discount if batch else 1.0
    saved = {"prefix_cache": prefix * paid, "batch_discount": full * (1.0 - paid)}
    return Charge(full * paid, {k: v for k, v in saved.items() if v > 0})


def charge(result: JobResult, book: PriceBook | None) -> Charge:
    """What ``result``'s job cost and saved. A job answered from the cache or by an
    identical job's call cost 0 and saved what ``hit_usage`` recorded; a job without usage
    made no call (cost None: nothing to count). Without a book: the cost its usage
    carries (what it saved, by reason, is then not known)."""
    u = result.usage
    if u is None:
        return Charge(None)
    reason = HIT_REASONS.get(result.cache or "")
    if reason is not None:
        return Charge(0.0, {reason: u.saved_usd} if u.saved_usd else {})
    if book is None:
        return Charge(u.cost_usd)
    price = book.price(result.provider, result.model or "") if result.provider else None
    if price is None:
        return Charge(None)
    return call_charge(u, price, batch=result.lane == "provider_batch")


def priced(result: JobResult, book: PriceBook | None) -> tuple[JobResult, Charge]:
    """``result`` with its usage's ``cost_usd`` and ``saved_usd`` (the same object when
    they are already there or there is nothing to price), and its charge."""
    got = charge(result, book)
    u = result.usage
    if u is None or book is None or (u.cost_usd == got.cost
                                     and u.saved_usd == got.saved_total):
        return result, got
    usage = u.model_copy(update={"cost_usd": got.cost, "saved_usd": got.saved_total})
    return result.model_copy(update={"usage": usage}), got


def hit_usage(source: Usage | None, price: Price | None) -> Usage | None:
    """The usage of a job answered with ``source``'s answer (the cache, or an identical
    job's call): the provider computed nothing for it, so its prompt tokens count as
    cached, it cost 0 and it saved what its own call would have cost (``source``'s tokens
    at ``price`` on the fast lane; without a price, what ``source`` cost, if known)."""
    if source is None:
        return None
    if price is not None:
        saved: float | None = call_charge(source, price).cost
    else:
        saved = source.cost_usd
    return Usage(prompt_tokens=source.prompt_tokens, completion_tokens=source.completion_tokens,
                 cached_tokens=source.prompt_tokens, cost_usd=0.0, saved_usd=saved)


def estimate_prompt_tokens(spec: JobSpec) -> int:
    """A job's prompt tokens by the scheduler's estimate (``scheduler.pool``: its text at
    four characters a token, images by their rule, tools and schema as text)."""
    tokens = len(spec.text) // CHARS_PER_TOKEN + 1
    if spec.messages is None and spec.tools is None and spec.response_format is None:
        return tokens
    return tokens + extra_tokens(spec.messages, spec.tools, spec.response_format)


def estimate_cost(spec: JobSpec, price: Price | None, default_output_tokens: int) -> float | None:
    """The most a job is expected to cost: its estimated prompt tokens at the dearer of
    the input and cache-write prices, and ``max_tokens`` of output (else the deployment's
    default, else ``default_output_tokens``); at the batch discount only for a job that
    asks for the batch lane. None without a price."""
    if price is None:
        return None
    prompt = estimate_prompt_tokens(spec)
    output = (spec.params.max_tokens or price.default_output_tokens or default_output_tokens)
    r = price.rates_for(prompt)
    full = (prompt * max(r.input, r.cache_write) + output * r.output) / PER
    return full * (price.batch_discount if spec.lane == "provider_batch" else 1.0)

"""What each deployment (``provider|model``) charges: US dollars per million tokens of
input, cached input (read from the provider's prompt cache), cache writes and output,
and the fraction of that paid through the provider's batch endpoint.

Where a price comes from, first found wins:

1. ``PROMPTBATCH_PRICES`` (``Settings.prices``): per deployment, over the library's price
   field by field.
2. The price library ``genai-prices`` (Pydantic's price data), from the snapshot its
   package ships: nothing is downloaded, its update functions are never called. The
   ``openai`` and ``anthropic`` providers are looked up by their base URL, as the library
   matches providers (``api.openai.com`` is OpenAI; OpenRouter, Together, Groq, Azure ...
   are themselves); a base URL it does not know (a local vLLM, llama.cpp or Ollama server)
   has no price: its jobs cost null unless ``PROMPTBATCH_PRICES`` names one.
3. ``simulated`` is priced as OpenAI's ``gpt-4o-mini`` (``SIMULATED_PRICED_AS``), with
   OpenAI's batch discount, so the demo and the benchmarks show money; ``echo`` costs 0: it
   is a local stub that nobody bills (a null would warn at every start of the default
   configuration and hide the spend rows of tests and demos).

A deployment with none of these has no price (cost null), never a guessed one; the
processes that price results warn once at start for the deployments they know of
(``PriceBook.warn_unpriced``), and once for any other the first time it is seen.

Pure but for ``library_price`` (which reads the library's bundled data once per
deployment) and the warning's log line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from config.settings import PriceEntry, Settings

log = logging.getLogger(__name__)

#: The fraction of the price paid through a provider's batch endpoint (OpenAI's Batch
#: API and Anthropic's Message Batches: half price); other providers: none known.
BATCH_DISCOUNTS: dict[str, float] = {"openai": 0.5, "anthropic": 0.5}
#: The HTTP providers' own APIs (a book made without base URLs prices them as these).
OFFICIAL_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
#: The real model whose price ``simulated`` is given (``provider``, ``model``).
SIMULATED_PRICED_AS = ("openai", "gpt-4o-mini")
#: ``simulated`` answers 32 tokens when a job sets no max_tokens.
SIMULATED_OUTPUT_TOKENS = 32


@dataclass(frozen=True, slots=True)
class Rates:
    """US dollars per million tokens."""

    input: float
    cached_input: float
    cache_write: float
    output: float


@dataclass(frozen=True, slots=True)
class Price:
    """A deployment's price."""

    rates: Rates
    #: The fraction of the price paid through the provider's batch endpoint (1: none).
    batch_discount: float = 1.0
    #: Where the price came from, for messages (``promptbatch spend``, the warning).
    source: str = ""
    #: A provider's long-context tier: above this many prompt tokens, these rates.
    long_context: tuple[int, Rates] | None = None
    #: Output tokens a job without max_tokens is taken to cost (None: the setting's).
    default_output_tokens: int | None = None

    def rates_for(self, prompt_tokens: int) -> Rates:
        """The rates of a request with ``prompt_tokens`` prompt tokens."""
        if self.long_context is not None and prompt_tokens > self.long_context[0]:
            return self.long_context[1]
        return self.rates


FREE = Price(Rates(0.0, 0.0, 0.0, 0.0), 1.0, "echo: a local stub, free")


def _num(value: Any) -> float | None:
    """A library price as a float (a tiered price: its base), None when unset."""
    if value is None:
        return None
    base = getattr(value, "base", value)
    return float(base)


def _tier_rates(mp: Any, plain: Rates) -> tuple[int, Rates] | None:
    """The rates of the library's first price tier (all of a model's tiers start at the
    same prompt size), or None for a model without tiers."""
    start: int | None = None
    tiered: dict[str, float] = {}
    for ours, theirs in (("input", "input_mtok"), ("cached_input", "cache_read_mtok"),
                         ("cache_write", "cache_write_mtok"), ("output", "output_mtok")):
        value = getattr(mp, theirs, None)
        tiers = getattr(value, "tiers", None)
        if tiers:
            start = int(tiers[0].start) if start is None else start
            tiered[ours] = float(tiers[0].price)
    if start is None:
        return None
    return start, replace(plain, **tiered)


def library_price(provider: str, model: str, *, api_url: str | None = None,
                  at: datetime | None = None) -> Price | None:
    """The price ``genai-prices`` gives ``model`` at the provider named by ``api_url``
    (else by the provider's name), from its bundled snapshot; None when it knows neither
    the provider nor the model, or has no token prices for it."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    try:
        found, info = snapshot.find_provider_model(
            model, None, None if api_url else provider, api_url)
    except LookupError:
        return None
    mp = info.get_prices(at or datetime.now(tz=UTC))
    given = _num(getattr(mp, "input_mtok", None))
    output = _num(getattr(mp, "output_mtok", None))
    if given is None or output is None:
        return None
    cached = _num(getattr(mp, "cache_read_mtok", None))
    write = _num(getattr(mp, "cache_write_mtok", None))
    plain = Rates(given, given if cached is None else cached,
                  given if write is None else write, output)
    return Price(plain, BATCH_DISCOUNTS.get(found.id, 1.0),
                 f"genai-prices: {found.id} {info.id}", _tier_rates(mp, plain))


def _override(base: Price | None, entry: PriceEntry, provider: str, name: str) -> Price:
    """``base`` with the fields ``entry`` sets (a deployment the library does not price
    needs at least input and output: ``Settings`` cannot tell, so this says it)."""
    if base is None:
        if entry.input is None or entry.output is None:
            raise ValueError(f"prices[{name!r}]: give 'input' and 'output' (US dollars per "
                             "million tokens): the price library has no price for it")
        rates = Rates(entry.input, entry.input, entry.input, entry.output)
        base = Price(rates, BATCH_DISCOUNTS.get(provider, 1.0))
    r = base.rates
    rates = Rates(r.input if entry.input is None else entry.input,
                  r.cached_input if entry.cached_input is None else entry.cached_input,
                  r.cache_write if entry.cache_write is None else entry.cache_write,
                  r.output if entry.output is None else entry.output)
    changed = rates != r
    return Price(rates,
                 base.batch_discount if entry.batch_discount is None else entry.batch_discount,
                 "PROMPTBATCH_PRICES" + (f" over {base.source}" if base.source else ""),
                 None if changed else base.long_context,
                 entry.default_output_tokens or base.default_output_tokens)


#: Looks a price up in the library: (provider, model, api_url) -> price.
Library = Callable[..., Price | None]


class PriceBook:
    """Every deployment's price, looked up once each (thread-safe)."""

    def __init__(self, overrides: Mapping[str, PriceEntry] | None = None, *,
                 base_urls: Mapping[str, str] | None = None,
                 library: Library = library_price) -> None:
        self.overrides = dict(overrides or {})
        self.base_urls = dict(OFFICIAL_URLS if base_urls is None else base_urls)
        self.library = library
        self._found: dict[str, Price | None] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> PriceBook:
        """The book of ``settings``: its overrides, and the base URLs the HTTP providers
        use (the first replica's: replicas are one deployment)."""
        urls = {"openai": settings.openai_base_url, "anthropic": settings.anthropic_base_url}
        for provider, entries in settings.provider_replicas.items():
            if entries:
                urls[provider] = entries[0].url
        return cls(settings.prices, base_urls={
            p: u.split(",")[0].strip() for p, u in urls.items()})

    def price(self, provider: str, model: str, *, warn: bool = True) -> Price | None:
        """The price of ``provider|model``, None when nothing prices it (then, with
        ``warn``, a warning the first time in this process)."""
        name = f"{provider}|{model}"
        try:
            found = self._found[name]
        except KeyError:
            found = self._look_up(provider, model, name)
            with self._lock:
                self._found[name] = found
        if found is None and warn and name not in self._warned:
            self.warn_unpriced([name])
        return found

    def _look_up(self, provider: str, model: str, name: str) -> Price | None:
        if provider == "echo":
            base: Price | None = FREE
        elif provider == "simulated":
            real = self.library(*SIMULATED_PRICED_AS)
            base = None if real is None else replace(
                real, source=f"simulated: priced as {'|'.join(SIMULATED_PRICED_AS)} "
                f"({real.source})", default_output_tokens=SIMULATED_OUTPUT_TOKENS)
        elif provider in self.base_urls:
            base = self.library(provider, model, api_url=self.base_urls[provider])
        else:
            base = None
        entry = self.overrides.get(name)
        return base if entry is None else _override(base, entry, provider, name)

    def check(self) -> None:
        """Raise ``ValueError`` naming an override that cannot make a price (at start)."""
        for name in self.overrides:
            provider, _, model = name.partition("|")
            self.price(provider, model, warn=False)

    def unpriced(self, deployments: Iterable[str]) -> list[str]:
        """The deployments of ``deployments`` (``provider|model``) without a price
        (looked up without a warning)."""
        out = []
        for name in dict.fromkeys(deployments):
            provider, _, model = name.partition("|")
            if provider and model and self.price(provider, model, warn=False) is None:
                out.append(name)
        return out

    def warn_unpriced(self, names: Iterable[str]) -> None:
        """One warning for the deployments of ``names`` not warned about yet."""
        with self._lock:
            fresh = [n for n in names if n not in self._warned]
            self._warned.update(fresh)
        if not fresh:
            return
        where = "; ".join(self._why(n) for n in fresh)
        log.warning("no price for %s: their jobs have cost null and count toward no budget. "
                    "Set PROMPTBATCH_PRICES='{\"%s\": {\"input\": ..., \"output\": ...}}' "
                    "(US dollars per million tokens) to price them", where, fresh[0])

    def _why(self, name: str) -> str:
        provider = name.partition("|")[0]
        url = self.base_urls.get(provider)
        if url:
            return f"{name} (the price library knows no such model at {url})"
        return f"{name} (no price is known for the provider {provider!r})"


def known_deployments(settings: Settings, providers: Iterable[str]) -> list[str]:
    """The deployments a process can tell at start that jobs will use: each provider's
    default model, the default model, the allowed models, the aliases' targets, the
    fallbacks, the rate limits and the prices set."""
    from jobs.validation import PROVIDER_DEFAULT_MODELS

    names = [f"{p}|{PROVIDER_DEFAULT_MODELS[p]}" for p in providers
             if p in PROVIDER_DEFAULT_MODELS]
    if settings.default_model:
        names.append(f"{settings.default_provider}|{settings.default_model}")
    names += [f"{p}|{m}" for p, models in settings.allowed_models.items() for m in models]
    names += list(settings.model_aliases.values())
    for source, targets in settings.fallbacks.items():
        names += [source, *targets]
    names += [n for n in settings.rate_limits if "|" in n]
    return [n for n in dict.fromkeys(names) if n.split("|", 1)[0] in set(providers)]


def warn_at_start(book: PriceBook, settings: Settings, providers: Iterable[str]) -> list[str]:
    """Check the overrides and warn once about the known deployments without a price;
    return them."""
    book.check()
    missing = book.unpriced(known_deployments(settings, list(providers)))
    book.warn_unpriced(missing)
    return missing

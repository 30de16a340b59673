"""Prices per deployment: from genai-prices' bundled data, overridden per deployment, and
none (cost null, one warning) where nothing prices a deployment."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest

from config.settings import PriceEntry, Settings
from jobs.costs import call_charge
from jobs.models import Usage
from jobs.prices import PriceBook, library_price, warn_at_start


def _settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg,arg-type]


def test_openai_at_its_own_url_is_priced_from_the_library_and_agrees_with_its_calc_price(
) -> None:
    from genai_prices import Usage as LibUsage
    from genai_prices import calc_price

    book = PriceBook.for_settings(_settings())
    price = book.price("openai", "gpt-4o")
    assert price is not None and price.source == "genai-prices: openai gpt-4o"
    assert price.batch_discount == 0.5
    usage = Usage(prompt_tokens=3000, cached_tokens=1024, completion_tokens=500)
    ours = call_charge(usage, price).cost
    theirs = calc_price(LibUsage(input_tokens=3000, cache_read_tokens=1024, output_tokens=500),
                        "gpt-4o", provider_id="openai").total_price
    assert ours == pytest.approx(float(theirs), rel=1e-9)
    assert Decimal(str(ours)) > 0


def test_anthropic_cache_writes_are_priced_as_the_library_prices_them() -> None:
    from genai_prices import Usage as LibUsage
    from genai_prices import calc_price

    price = PriceBook.for_settings(_settings()).price("anthropic", "claude-haiku-4-5")
    assert price is not None
    usage = Usage(prompt_tokens=5000, cached_tokens=2000, cache_write_tokens=1500,
                  completion_tokens=300)
    theirs = calc_price(LibUsage(input_tokens=5000, cache_read_tokens=2000,
                                 cache_write_tokens=1500, output_tokens=300),
                        "claude-haiku-4-5", provider_id="anthropic").total_price
    assert call_charge(usage, price).cost == pytest.approx(float(theirs), rel=1e-9)


def test_a_long_prompt_is_priced_at_the_providers_long_context_tier() -> None:
    price = library_price("anthropic", "claude-sonnet-4-5")
    assert price is not None and price.long_context is not None
    start, rates = price.long_context
    assert price.rates_for(start).input == price.rates.input
    assert price.rates_for(start + 1) == rates and rates.input > price.rates.input


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/v1", "http://localhost:11434/v1"])
def test_the_openai_provider_at_a_local_server_has_no_price(url: str) -> None:
    book = PriceBook.for_settings(_settings(openai_base_url=url))
    assert book.price("openai", "gpt-4o", warn=False) is None


def test_an_openai_compatible_provider_the_library_knows_is_priced_as_itself() -> None:
    book = PriceBook.for_settings(_settings(openai_base_url="https://openrouter.ai/api/v1"))
    price = book.price("openai", "openai/gpt-4o", warn=False)
    assert price is not None and price.source.startswith("genai-prices: openrouter")


def test_an_override_wins_field_by_field_and_prices_what_the_library_does_not_know() -> None:
    book = PriceBook({"openai|gpt-4o": PriceEntry(output=8.0),
                      "openai|local-llama": PriceEntry(input=0.1, output=0.2)},
                     base_urls={"openai": "http://127.0.0.1:9/v1"})
    local = book.price("openai", "local-llama")
    assert local is not None
    assert (local.rates.input, local.rates.cached_input, local.rates.output) == (0.1, 0.1, 0.2)
    assert local.batch_discount == 0.5 and local.source == "PROMPTBATCH_PRICES"
    both = PriceBook({"openai|gpt-4o": PriceEntry(output=8.0)})
    mixed = both.price("openai", "gpt-4o")
    assert mixed is not None and (mixed.rates.input, mixed.rates.output) == (2.5, 8.0)


def test_an_override_of_an_unknown_deployment_without_input_and_output_is_refused() -> None:
    book = PriceBook({"openai|local-llama": PriceEntry(output=0.2)},
                     base_urls={"openai": "http://127.0.0.1:9/v1"})
    with pytest.raises(ValueError, match=r"prices\['openai\|local-llama'\].*'input'"):
        book.check()


def test_prices_in_the_environment_are_validated_by_field() -> None:
    with pytest.raises(ValueError, match="batch_discount"):
        _settings(prices={"openai|gpt-4o": {"batch_discount": 2}})
    with pytest.raises(ValueError, match=r"not 'provider\|model'"):
        _settings(prices={"gpt-4o": {"input": 1, "output": 2}})


def test_simulated_is_priced_as_a_named_real_model_and_echo_is_free() -> None:
    book = PriceBook.for_settings(_settings())
    sim, real = book.price("simulated", "sim-1"), library_price("openai", "gpt-4o-mini")
    assert sim is not None and real is not None
    assert sim.rates == real.rates and sim.batch_discount == 0.5
    assert "priced as openai|gpt-4o-mini" in sim.source
    echo = book.price("echo", "echo-1")
    assert echo is not None and call_charge(Usage(prompt_tokens=10 ** 6), echo).cost == 0.0


def test_deployments_without_a_price_get_one_warning_at_start_and_none_again(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(openai_base_url="http://127.0.0.1:9/v1",
                         model_aliases={"llama": "openai|llama-3", "fast": "simulated|sim-1"})
    book = PriceBook.for_settings(settings)
    with caplog.at_level(logging.WARNING, logger="jobs.prices"):
        missing = warn_at_start(book, settings, ["echo", "simulated", "openai"])
        assert book.price("openai", "llama-3") is None
        assert book.price("openai", "gpt-4o-mini") is None
    assert missing == ["openai|gpt-4o-mini", "openai|llama-3"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "openai|llama-3" in warnings[0].getMessage()
    assert "PROMPTBATCH_PRICES" in warnings[0].getMessage()
    with caplog.at_level(logging.WARNING, logger="jobs.prices"):
        book.price("openai", "another-model")  # seen later: one warning of its own
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2

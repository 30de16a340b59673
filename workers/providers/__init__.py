"""Providers by name, built by ``create_provider``."""

from __future__ import annotations

from enum import StrEnum

from config.settings import Settings
from workers.providers.base import Provider, ProviderReply, ProviderRequest


class ProviderName(StrEnum):
    """Providers a job may name."""

    ECHO = "echo"  #: deterministic and instant, for tests
    SIMULATED = "simulated"  #: a cost model of a prefix-caching server, for benchmarks
    OPENAI = "openai"  #: any OpenAI-compatible HTTP server
    ANTHROPIC = "anthropic"  #: the Anthropic Messages API


def create_provider(name: str, settings: Settings) -> Provider:
    """Build the provider called ``name``."""
    try:
        chosen = ProviderName(name)
    except ValueError:
        raise ValueError(f"Unknown provider: {name!r}; choose one of "
                         f"{', '.join(p.value for p in ProviderName)}") from None
    if chosen is ProviderName.ECHO:
        from workers.providers.echo import EchoProvider

        return EchoProvider(hooks=settings.echo_test_hooks, call_log=settings.echo_call_log)
    if chosen in (ProviderName.OPENAI, ProviderName.ANTHROPIC):
        from workers.providers.anthropic import AnthropicProvider
        from workers.providers.openai import OpenAIProvider
        from workers.providers.replicas import Replicas

        kind = OpenAIProvider if chosen is ProviderName.OPENAI else AnthropicProvider
        replicas = settings.replicas(chosen.value)
        if not replicas:
            return kind(settings)
        return Replicas([kind(settings, base_url=url) for url, _, _ in replicas],
                        [url for url, _, _ in replicas])
    from workers.providers.simulated import CostModel, SimulatedProvider

    return SimulatedProvider(CostModel.from_settings(settings))


__all__ = ["Provider", "ProviderName", "ProviderReply", "ProviderRequest", "create_provider"]

"""The simulated provider's cost model: prefix reuse is cheaper, usage is reported."""

from __future__ import annotations

from jobs.models import GenerationParams
from workers.providers.base import ProviderRequest
from workers.providers.simulated import BLOCK_TOKENS, CostModel, SimulatedProvider

PREFIX = "System: you are a careful analyst. " * 40  # about 350 tokens


def req(i: int, text: str, max_tokens: int = 8) -> ProviderRequest:
    return ProviderRequest(job_id=f"j{i}", model="sim-1",
                           params=GenerationParams(max_tokens=max_tokens), prompt=text,
                           messages=None, deadline=None, text=text)


def test_a_shared_prefix_is_cached_after_its_first_use() -> None:
    sim = SimulatedProvider(CostModel(time_scale=0))
    replies = sim.complete([req(i, PREFIX + f"question {i}") for i in range(4)])
    usage = [r.usage for r in replies]
    assert all(u is not None for u in usage)
    assert usage[0].cached_tokens == 0  # type: ignore[union-attr]
    for u in usage[1:]:
        assert u is not None and u.cached_tokens >= len(PREFIX) // 4 - BLOCK_TOKENS
        assert u.cached_tokens < u.prompt_tokens
    assert all(u.completion_tokens == 8 for u in usage if u is not None)


def test_grouped_prompts_cost_less_than_unrelated_ones() -> None:
    grouped = SimulatedProvider(CostModel(time_scale=0))
    spread = SimulatedProvider(CostModel(time_scale=0))
    same, _ = grouped.cost([req(i, PREFIX + f"q{i}") for i in range(8)])
    different, _ = spread.cost([req(i, f"{i} " + PREFIX) for i in range(8)])
    assert same < different * 0.5


def test_the_cache_is_bounded() -> None:
    sim = SimulatedProvider(CostModel(time_scale=0, cache_tokens=BLOCK_TOKENS * 4))
    sim.complete([req(i, f"{i}" * 4000) for i in range(3)])
    assert len(sim.cache.blocks) <= 4

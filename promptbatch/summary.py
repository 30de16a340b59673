"""The summary of a run: throughput, batching and latency per class. Pure."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from config.settings import PRIORITY_NAMES
from jobs.models import JobResult, JobState


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class ClassLatency:
    """Latency of one priority class, in milliseconds."""

    name: str
    jobs: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Summary:
    """What a run did."""

    jobs: int
    batches: int
    mean_batch_size: float
    mean_similarity: float | None
    jobs_per_s: float
    wall_s: float
    succeeded: int
    failed: int
    expired: int
    cancelled: int
    prompt_tokens: int
    cached_tokens: int
    classes: list[ClassLatency] = field(default_factory=list)
    #: Jobs with a deadline, and of them the ones that missed it (expired, or late).
    with_deadline: int = 0
    missed_deadline: int = 0
    #: Jobs answered without a provider call of their own, by how (exact, coalesced, ...).
    from_cache: dict[str, int] = field(default_factory=dict)


def summarize(results: Sequence[JobResult], priorities: Sequence[int], wall_s: float) -> Summary:
    """Summarise results; ``priorities[i]`` is the class of ``results[i]``."""
    batches: dict[str, tuple[int, float | None]] = {}
    for r in results:
        if r.batch_id:
            batches[r.batch_id] = (r.batch_size or 0, r.batch_similarity)
    sims = [s for _, s in batches.values() if s is not None]
    counted = [r for r in results if r.batch_id]
    per_class: list[ClassLatency] = []
    for cls, name in enumerate(PRIORITY_NAMES):
        lat = [r.latency_ms for r, p in zip(results, priorities, strict=True)
               if p == cls and r.latency_ms is not None]
        if lat:
            per_class.append(ClassLatency(name, len(lat), percentile(lat, 50),
                                          percentile(lat, 99)))
    states = [r.state for r in results]
    usage = [r.usage for r in results if r.usage is not None]
    return Summary(
        jobs=len(results),
        batches=len(batches),
        mean_batch_size=(len(counted) / len(batches)) if batches else 0.0,
        mean_similarity=(sum(sims) / len(sims)) if sims else None,
        jobs_per_s=len(results) / wall_s if wall_s > 0 else 0.0,
        wall_s=wall_s,
        succeeded=states.count(JobState.SUCCEEDED),
        failed=states.count(JobState.FAILED),
        expired=states.count(JobState.EXPIRED),
        cancelled=states.count(JobState.CANCELLED),
        prompt_tokens=sum(u.prompt_tokens for u in usage),
        cached_tokens=sum(u.cached_tokens for u in usage),
        classes=per_class,
        with_deadline=sum(1 for r in results if r.deadline is not None),
        missed_deadline=sum(1 for r in results if r.deadline is not None and r.missed_deadline),
        from_cache=dict(sorted(Counter(r.cache for r in results if r.cache).items())),
    )

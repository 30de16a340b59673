"""The summary of a run: throughput, batching and latency per class. Pure."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.table import Table

from config.settings import PRIORITY_NAMES
from jobs import costs
from jobs.answers import INVALID_OUTPUT
from jobs.models import JobResult, JobState
from jobs.money import usd
from jobs.prices import PriceBook


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
    #: Jobs whose answer was checked against a JSON response format or tools: valid at
    #: the first answer, valid after being asked again (repaired), FAILED invalid_output.
    valid_first: int = 0
    repaired: int = 0
    invalid: int = 0
    #: What the run cost (US dollars, by the deployments' prices), the jobs whose
    #: deployment has no price (their cost is unknown), and what was saved, by reason.
    cost_usd: float = 0.0
    unpriced: int = 0
    saved_usd: dict[str, float] = field(default_factory=dict)
    #: Of ``jobs``, those an interrupted run had finished before this one resumed it
    #: (counted in every figure but the speed, which is this run's), and the earlier
    #: jobs whose results could not be read again (in the output, not in the figures).
    resumed: int = 0
    not_found: int = 0

    @property
    def checked(self) -> int:
        """Jobs whose answers were checked (see ``valid_first``)."""
        return self.valid_first + self.repaired + self.invalid

    def schema_row(self) -> tuple[str, str] | None:
        """The summary's line about checked answers (None when no job asked for one)."""
        if not self.checked:
            return None
        return ("answers checked: valid at first answer / repaired / failed",
                f"{self.valid_first} / {self.repaired} / {self.invalid}")


class Quantiles:
    """Percentiles of a stream of values in bounded memory: exact (nearest rank) up to
    ``exact_up_to`` values, then from a histogram of 1%-wide logarithmic buckets (each
    value is then known to within 1%)."""

    GROWTH = 1.01

    def __init__(self, exact_up_to: int = 20_000) -> None:
        self.exact_up_to = exact_up_to
        self.values: list[float] | None = []
        self.buckets: dict[int, int] = {}
        self.count = 0

    def add(self, value: float) -> None:
        self.count += 1
        if self.values is not None:
            self.values.append(value)
            if len(self.values) <= self.exact_up_to:
                return
            for v in self.values:
                self._bucket(v)
            self.values = None
            return
        self._bucket(value)

    def _bucket(self, value: float) -> None:
        k = math.floor(math.log(max(value, 1e-3), self.GROWTH))
        self.buckets[k] = self.buckets.get(k, 0) + 1

    def percentile(self, q: float) -> float | None:
        if self.values is not None:
            return percentile(self.values, q)
        rank = max(1, min(self.count, math.ceil(q / 100.0 * self.count)))
        seen = 0
        for k in sorted(self.buckets):
            seen += self.buckets[k]
            if seen >= rank:
                return float(self.GROWTH ** (k + 1))
        return None


class SummaryBuilder:
    """A run's summary built result by result, in memory bounded by the number of
    classes, not of jobs (``summarize`` for a list). Batches are counted without
    remembering their ids: each result of a batch of k contributes 1/k. ``prices``:
    what splits a call's savings into prefix-cache reads and the batch discount
    (without it, a call's savings count as ``prefix_cache``, or ``batch_lane`` for one
    that went through a provider's batch endpoint)."""

    def __init__(self, prices: PriceBook | None = None) -> None:
        self.prices = prices
        self.cost = 0.0
        self.unpriced = 0
        self.saved: defaultdict[str, float] = defaultdict(float)
        self.jobs = 0
        self.batch_share = 0.0
        self.similarity_share = 0.0
        self.similar_batches = 0.0
        self.in_batches = 0
        self.states: Counter[JobState] = Counter()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.latency = [Quantiles() for _ in PRIORITY_NAMES]
        self.with_deadline = 0
        self.missed_deadline = 0
        self.from_cache: Counter[str] = Counter()
        self.checked: Counter[str] = Counter()
        self.resumed = 0
        self.not_found = 0

    def add(self, r: JobResult, priority: int, *, earlier: bool = False) -> None:
        """Count a result; ``earlier``: one an interrupted run finished (not counted in
        this run's speed)."""
        self.jobs += 1
        self.resumed += earlier
        if r.batch_id and r.batch_size:
            self.in_batches += 1
            self.batch_share += 1.0 / r.batch_size
            if r.batch_similarity is not None:
                self.similarity_share += r.batch_similarity / r.batch_size
                self.similar_batches += 1.0 / r.batch_size
        self.states[r.state] += 1
        if r.usage is not None:
            self.prompt_tokens += r.usage.prompt_tokens
            self.cached_tokens += r.usage.cached_tokens
            self._money(r)
        if r.latency_ms is not None and 0 <= priority < len(self.latency):
            self.latency[priority].add(r.latency_ms)
        if r.deadline is not None:
            self.with_deadline += 1
            self.missed_deadline += r.missed_deadline
        if r.cache:
            self.from_cache[r.cache] += 1
        if r.error_code == INVALID_OUTPUT:
            self.checked["invalid"] += 1
        elif r.state is JobState.SUCCEEDED and r.schema_retries is not None:
            self.checked["repaired" if r.schema_retries else "valid_first"] += 1

    def _money(self, r: JobResult) -> None:
        u = r.usage
        assert u is not None
        if u.cost_usd is None and r.cache is None:
            self.unpriced += 1
            return
        self.cost += u.cost_usd or 0.0
        if self.prices is not None:
            for reason, amount in costs.charge(r, self.prices).saved.items():
                self.saved[reason] += amount
        elif u.saved_usd:
            self.saved[costs.HIT_REASONS.get(r.cache or "") or (
                "batch_lane" if r.lane == "provider_batch" else "prefix_cache")] += u.saved_usd

    def build(self, wall_s: float) -> Summary:
        batches = round(self.batch_share)
        classes = [ClassLatency(name, q.count, q.percentile(50), q.percentile(99))
                   for name, q in zip(PRIORITY_NAMES, self.latency, strict=True) if q.count]
        return Summary(
            jobs=self.jobs, batches=batches,
            mean_batch_size=self.in_batches / self.batch_share if self.batch_share else 0.0,
            mean_similarity=(self.similarity_share / self.similar_batches
                             if self.similar_batches else None),
            jobs_per_s=(self.jobs - self.resumed) / wall_s if wall_s > 0 else 0.0,
            wall_s=wall_s,
            succeeded=self.states[JobState.SUCCEEDED], failed=self.states[JobState.FAILED],
            expired=self.states[JobState.EXPIRED], cancelled=self.states[JobState.CANCELLED],
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
            classes=classes, with_deadline=self.with_deadline,
            missed_deadline=self.missed_deadline,
            from_cache=dict(sorted(self.from_cache.items())),
            valid_first=self.checked["valid_first"], repaired=self.checked["repaired"],
            invalid=self.checked["invalid"], cost_usd=self.cost, unpriced=self.unpriced,
            saved_usd={k: v for k, v in sorted(self.saved.items()) if v},
            resumed=self.resumed, not_found=self.not_found)


def summarize(results: Sequence[JobResult], priorities: Sequence[int], wall_s: float,
              prices: PriceBook | None = None) -> Summary:
    """Summarise results; ``priorities[i]`` is the class of ``results[i]``."""
    builder = SummaryBuilder(prices)
    for r, p in zip(results, priorities, strict=True):
        builder.add(r, p)
    return builder.build(wall_s)


def money_rows(s: Summary) -> list[tuple[str, str]]:
    """The summary's lines about money: the cost (and the jobs without a price), what was
    saved, and a line per reason (none when nothing had a price)."""
    if s.cost_usd == 0 and not s.saved_usd and not s.unpriced:
        return []
    unpriced = (f" ({s.unpriced} job{'' if s.unpriced == 1 else 's'} without a price)"
                if s.unpriced else "")
    rows = [("cost", usd(s.cost_usd) + unpriced)]
    saved = sum(s.saved_usd.values())
    if saved:
        share = 100.0 * saved / (saved + s.cost_usd) if saved + s.cost_usd else 0.0
        rows.append((f"saved ({share:.0f}% of what it would have cost)", usd(saved)))
        rows += [(f"  by {reason}", usd(amount)) for reason, amount in s.saved_usd.items()]
    return rows


def summary_table(s: Summary) -> Table:
    """The summary as the table `promptbatch run` prints."""
    table = Table(title="promptbatch run", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("jobs", str(s.jobs))
    if s.resumed or s.not_found:
        table.add_row("of them finished before this run resumed", str(s.resumed))
    if s.not_found:
        table.add_row("earlier results not found again (in the output, not counted here)",
                      str(s.not_found))
    table.add_row("batches", str(s.batches))
    table.add_row("mean batch size", f"{s.mean_batch_size:.1f}")
    table.add_row("mean similarity inside batches",
                  "-" if s.mean_similarity is None else f"{s.mean_similarity:.3f}")
    this_run = " (this run)" if s.resumed else ""
    table.add_row(f"jobs/s{this_run}", f"{s.jobs_per_s:.1f}")
    table.add_row(f"wall time{this_run}", f"{s.wall_s:.2f} s")
    table.add_row("succeeded / failed / expired / cancelled",
                  f"{s.succeeded} / {s.failed} / {s.expired} / {s.cancelled}")
    if s.with_deadline:
        table.add_row("deadline misses (expired or late)",
                      f"{s.missed_deadline} of {s.with_deadline}")
    if s.prompt_tokens:
        table.add_row("prompt tokens cached",
                      f"{s.cached_tokens} of {s.prompt_tokens} "
                      f"({100.0 * s.cached_tokens / s.prompt_tokens:.0f}%)")
    if s.from_cache:
        table.add_row("answered without a provider call of their own",
                      ", ".join(f"{kind} {n}" for kind, n in s.from_cache.items()))
    for row in money_rows(s):
        table.add_row(*row)
    if (checked := s.schema_row()) is not None:
        table.add_row(*checked)
    for c in s.classes:
        table.add_row(f"latency {c.name} ({c.jobs} jobs) p50 / p99",
                      f"{c.p50_ms or 0:.0f} / {c.p99_ms or 0:.0f} ms")
    return table

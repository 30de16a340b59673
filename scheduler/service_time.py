"""Service-time estimates per provider and model, learned from recent batches.

Batch time is modelled as ``seconds = a * size + b`` and fitted by least squares over the
last observations (as BentoML's adaptive batching does). Until enough observations exist
a conservative prior is used. Pure: observations go in, estimates come out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Prior per-job and fixed seconds of a batch before anything was observed, for the
#: providers that run in the worker (echo, simulated)...
PRIOR_PER_JOB_S = 0.01
PRIOR_FIXED_S = 0.05
#: ...and, conservatively, for remote providers: a job is not sent unless its deadline
#: leaves this much room, until the deployment's real times are learned.
REMOTE_PRIOR_PER_JOB_S = 0.05
REMOTE_PRIOR_FIXED_S = 2.0
REMOTE_PROVIDERS = frozenset({"openai", "anthropic"})
#: Observations kept per provider and model.
WINDOW = 64


def deployment(key: str) -> str:
    """``provider|model`` of a compatibility key ``provider|model|params``."""
    provider, model, _ = key.split("|", 2)
    return f"{provider}|{model}"


@dataclass(frozen=True, slots=True)
class Line:
    """``seconds = per_job * size + fixed``."""

    per_job: float
    fixed: float

    def at(self, size: int) -> float:
        """Estimated seconds of a batch of ``size`` jobs."""
        return max(0.0, self.per_job * size + self.fixed)


def fit(points: Iterable[tuple[int, float]]) -> Line | None:
    """Least-squares line through ``(size, seconds)`` points; None if under-determined."""
    pts = list(points)
    n = len(pts)
    if n < 3:
        return None
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        # All batches had the same size: spread the mean over per-job and fixed cost.
        return Line(per_job=my / (2 * mx) if mx else 0.0, fixed=my / 2)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    slope = max(0.0, slope)
    return Line(per_job=slope, fixed=max(0.0, my - slope * mx))


@dataclass
class ServiceModel:
    """Estimates per deployment, refitted as observations arrive."""

    prior: Line = field(default_factory=lambda: Line(PRIOR_PER_JOB_S, PRIOR_FIXED_S))
    remote_prior: Line = field(
        default_factory=lambda: Line(REMOTE_PRIOR_PER_JOB_S, REMOTE_PRIOR_FIXED_S))
    _points: dict[str, deque[tuple[int, float]]] = field(default_factory=dict)
    _lines: dict[str, Line] = field(default_factory=dict)

    def observe(self, deployment_name: str, size: int, seconds: float) -> None:
        """Record one finished batch."""
        pts = self._points.setdefault(deployment_name, deque(maxlen=WINDOW))
        pts.append((size, seconds))
        line = fit(pts)
        if line is not None:
            self._lines[deployment_name] = line

    def line(self, key: str) -> Line:
        """The fitted line of a compatibility key's deployment (or the prior)."""
        found = self._lines.get(deployment(key))
        if found is not None:
            return found
        return self.remote_prior if key.split("|", 1)[0] in REMOTE_PROVIDERS else self.prior

    def estimate(self, key: str, size: int) -> float:
        """Estimated seconds for a batch of ``size`` jobs of compatibility key ``key``."""
        return self.line(key).at(size)

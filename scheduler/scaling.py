"""How many worker slots the work needs: the scaling signal (``desired_worker_slots``).

Pure: the scheduler measures, this decides. For each class, critical first, the work of
its pending jobs and of every class above it (higher classes go first, so they use the
same slots earlier) must be done within the class's time: the horizon within which a
backlog should drain, or the slack of its most urgent deadline if that is shorter, but
never less than one batch takes. Enough slots for the tightest class, plus the slots the
arriving work keeps busy, is the answer: at least what is in flight, at most what the
providers' rate limits can absorb, and no more than there are batches to run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from config.settings import PRIORITY_NAMES


@dataclass(frozen=True, slots=True)
class ClassDemand:
    """What one class asks of the workers now.

    ``work_s``: slot-seconds to run its pending jobs (batch by batch, at the learned
    service times); ``batches``: the batches they make; ``inflight``: its batches sent and
    not finished; ``slack_s``: seconds left before its earliest pending deadline (None: no
    deadline pending); ``arriving_s``: slot-seconds of work arriving per second.
    """

    pending: int = 0
    work_s: float = 0.0
    batches: int = 0
    inflight: int = 0
    slack_s: float | None = None
    arriving_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Scale:
    """The signal and why: ``reason`` names the class (or rule) that set it."""

    desired: int
    reason: str
    keep_up: float
    drain: int
    cap: int | None


def desired_slots(demands: Sequence[ClassDemand], *, horizon_s: float, batch_s: float,
                  cap: int | None = None) -> Scale:
    """Worker slots that meet every class's deadlines and drain the backlog within
    ``horizon_s``. ``batch_s``: the time of one batch (the shortest time to finish
    anything); ``cap``: the most slots the rate limits can use (None: no limit)."""
    batch_s = max(batch_s, 1e-3)
    keep_up = sum(d.arriving_s for d in demands)
    work = 0.0
    batches = 0
    drain = 0
    reason = "idle"
    for cls, d in enumerate(demands):
        work += d.work_s + d.inflight * batch_s
        batches += d.batches + d.inflight
        if not work:
            continue
        allowed = horizon_s if d.slack_s is None else min(horizon_s, d.slack_s)
        need = min(math.ceil(work / max(allowed, batch_s)), batches)
        if need > drain:
            drain = need
            name = PRIORITY_NAMES[cls] if cls < len(PRIORITY_NAMES) else str(cls)
            reason = (f"{name} deadline in {d.slack_s:.0f} s"
                      if d.slack_s is not None and d.slack_s < horizon_s
                      else f"drain {name} and above within {horizon_s:.0f} s")
    inflight = sum(d.inflight for d in demands)
    desired = math.ceil(keep_up + drain - 1e-9)
    if keep_up > 0 and not drain:
        reason = "keep up with arrivals"
    desired = max(desired, inflight, 1 if (batches or keep_up > 0) else 0)
    if cap is not None and desired > cap:
        desired = max(cap, 1 if batches else 0)
        reason = f"capped by provider rate limits ({cap})"
    return Scale(desired=desired, reason=reason, keep_up=keep_up, drain=drain, cap=cap)


def rpm_of(rate_limits: Mapping[str, Mapping[str, float]], deployment: str) -> float | None:
    """Requests per minute a deployment (``provider|model``) is limited to, if any."""
    provider = deployment.split("|", 1)[0]
    limit = rate_limits.get(deployment) or rate_limits.get(provider)
    if not limit or not limit.get("rpm") or limit.get("per_tenant"):
        return None
    return float(limit["rpm"])


def rate_cap(per_job_s: Mapping[str, float],
             rate_limits: Mapping[str, Mapping[str, float]]) -> int | None:
    """The most slots the pending deployments' request limits keep busy (each job is one
    request to the limiter); None when any of them is not limited."""
    if not per_job_s:
        return None
    total = 0.0
    for deployment, seconds in per_job_s.items():
        rpm = rpm_of(rate_limits, deployment)
        if rpm is None:
            return None
        total += rpm / 60.0 * seconds
    return max(1, math.ceil(total))

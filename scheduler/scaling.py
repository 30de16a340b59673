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
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

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


@dataclass(frozen=True, slots=True)
class DeadlineRisk:
    """One class's pending deadlines against the current worker slots.

    ``pressure``: the largest, over its pending jobs with a deadline, of the time until
    the job is projected to finish (``projected_s``) over the time left before its
    deadline (``slack_s``): above 1, that job misses its deadline unless more slots come.
    ``need``: the slots that would meet every one of them.
    """

    cls: int
    pressure: float
    projected_s: float
    slack_s: float
    need: int


def deadline_risks(work_s: Sequence[float], deadlines: Sequence[ArrayLike], *, slots: int,
                   batch_s: float, inflight: int, keep_up: float = 0.0,
                   ) -> list[DeadlineRisk | None]:
    """Per class (critical first), its ``DeadlineRisk`` (None: no deadline pending).

    ``work_s[c]``: slot-seconds of all pending work of class ``c``; ``deadlines[c]``:
    ``(slack seconds, slot-seconds)`` of each of its pending jobs with a deadline, by
    slack (rows of an array, or pairs). Classes run in priority order and a class's jobs
    earliest deadline first, so a job finishes, in a fluid approximation, once the
    batches in flight, the work of the classes above and the jobs before it in its class
    are done on the ``slots`` slots that the arriving work (``keep_up`` slots) leaves,
    plus one batch's time (``batch_s``) of its own. It needs enough slots to do that work
    before its deadline, less its own batch's time (``need``: besides those the arrivals
    keep busy).
    """
    batch_s = max(batch_s, 1e-3)
    free = max(slots - keep_up, 0.1)
    above = inflight * batch_s
    out: list[DeadlineRisk | None] = []
    for cls, jobs in enumerate(deadlines):
        rows = np.asarray(jobs, dtype=np.float64).reshape(-1, 2)
        if len(rows):
            slack, work = rows[:, 0], rows[:, 1]
            done = above + np.cumsum(work)
            finish = done / free + batch_s
            pressure = finish / np.maximum(slack, 1e-3)
            worst = int(np.argmax(pressure))
            need = int(np.max(np.ceil(done / np.maximum(slack - batch_s, batch_s) - 1e-9)))
            out.append(DeadlineRisk(cls, float(pressure[worst]), float(finish[worst]),
                                    float(slack[worst]), need))
        else:
            out.append(None)
        above += work_s[cls] if cls < len(work_s) else 0.0
    return out


def class_deadlines(groups: Iterable[tuple[int, Collection[tuple[float, Any]], float]],
                    now: float, classes: int) -> list[np.ndarray]:
    """Per class, an array of ``(slack, slot-seconds)`` rows of its pending jobs with a
    deadline, by slack, from ``(class, (deadline, ...) pairs, slot-seconds per job)`` of
    each group (20,000 jobs: a few milliseconds)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(classes)]
    for cls, by_deadline, per_job in groups:
        n = len(by_deadline)
        if n and 0 <= cls < classes:
            rows = np.empty((n, 2))
            rows[:, 0] = np.fromiter((p[0] for p in by_deadline), np.float64, count=n) - now
            rows[:, 1] = per_job
            parts[cls].append(rows)
    out: list[np.ndarray] = []
    for cls in range(classes):
        if not parts[cls]:
            out.append(np.empty((0, 2)))
            continue
        rows = np.concatenate(parts[cls])
        out.append(rows[np.argsort(rows[:, 0], kind="stable")])
    return out

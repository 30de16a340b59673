"""The scaling signal: a fleet that follows it drains a burst within the horizon, and
the signal falls back once the backlog is gone."""

from __future__ import annotations

import math

import pytest

from scheduler.scaling import (
    ClassDemand,
    class_deadlines,
    deadline_risks,
    desired_slots,
    rate_cap,
    rpm_of,
)

BATCH = 32  # jobs per batch
BATCH_S = 2.0  # seconds per batch
JOB_S = BATCH_S / BATCH


def demand(pending: int, *, arriving: float = 0.0, slack: float | None = None,
           inflight: int = 0) -> ClassDemand:
    return ClassDemand(pending=pending, work_s=math.ceil(pending / BATCH) * BATCH_S,
                       batches=math.ceil(pending / BATCH), inflight=inflight, slack_s=slack,
                       arriving_s=arriving * JOB_S)


def simulate(arrivals: list[float], horizon: float) -> tuple[list[int], list[int]]:
    """One bulk class; each second the fleet is what the signal asked for a second ago
    (at least one slot), and each slot runs JOB_S of work per job. Returns the signal and
    the backlog, second by second."""
    backlog = 0.0
    slots = 1
    signal: list[int] = []
    backlog_seen: list[int] = []
    recent: list[float] = []
    for rate in arrivals:
        backlog += rate
        recent = [*recent, rate][-60:]
        backlog = max(0.0, backlog - slots / JOB_S)  # what the fleet ran this second
        scale = desired_slots([demand(0), demand(0), demand(0), demand(0),
                               demand(int(backlog), arriving=sum(recent) / len(recent))],
                              horizon_s=horizon, batch_s=BATCH_S)
        signal.append(scale.desired)
        backlog_seen.append(int(backlog))
        slots = max(1, scale.desired)
    return signal, backlog_seen


def test_the_signal_rises_with_a_burst_and_falls_when_it_drains() -> None:
    quiet, burst = [10.0] * 120, [400.0] * 60
    signal, backlog = simulate(quiet + burst + [0.0] * 600, horizon=120)
    before = max(signal[60:120])
    during = max(signal[120:180])
    assert before <= 2  # 10 jobs/s at 1/16 s each: under one slot
    assert during >= 5 * before  # the burst asks for many more slots
    end_of_burst = 180
    drained = next(t for t in range(end_of_burst, len(backlog)) if backlog[t] == 0)
    assert drained - end_of_burst <= 120  # following the signal drains within the horizon
    # Once drained and arrivals gone (after the one-minute rate window), back to nothing.
    assert signal[-1] == 0 and max(signal[drained + 61:]) == 0


def test_a_deadline_asks_for_more_than_the_horizon_does() -> None:
    loose = desired_slots([demand(0), demand(0), demand(640)], horizon_s=300, batch_s=BATCH_S)
    tight = desired_slots([demand(0), demand(0), demand(640, slack=4.0)], horizon_s=300,
                          batch_s=BATCH_S)
    assert loose.desired == 1  # 20 batches of 2 s fit in 300 s on one slot
    assert tight.desired == 10  # 40 s of work in 4 s
    assert "deadline" in tight.reason


def test_higher_classes_share_the_slots_of_a_lower_class_deadline() -> None:
    # The critical work goes first, so the normal deadline must cover both.
    alone = desired_slots([demand(0), demand(0), demand(320, slack=10.0)], horizon_s=300,
                          batch_s=BATCH_S)
    behind = desired_slots([demand(320), demand(0), demand(320, slack=10.0)], horizon_s=300,
                           batch_s=BATCH_S)
    assert behind.desired == 2 * alone.desired


def test_more_slots_than_batches_never_help() -> None:
    scale = desired_slots([demand(3, slack=0.01)], horizon_s=300, batch_s=BATCH_S)
    assert scale.desired == 1


def test_in_flight_batches_keep_their_slots_and_idle_asks_for_none() -> None:
    assert desired_slots([demand(0, inflight=6)], horizon_s=300, batch_s=BATCH_S).desired == 6
    idle = desired_slots([demand(0)] * 5, horizon_s=300, batch_s=BATCH_S)
    assert (idle.desired, idle.reason) == (0, "idle")


def test_rate_limits_cap_the_signal() -> None:
    limits = {"openai|gpt-4o": {"rpm": 600.0}}
    assert rpm_of(limits, "openai|gpt-4o") == 600.0
    assert rpm_of(limits, "anthropic|claude") is None
    cap = rate_cap({"openai|gpt-4o": 0.5}, limits)  # 10 jobs/s at 0.5 s each: 5 slots
    assert cap == 5
    assert rate_cap({"openai|gpt-4o": 0.5, "echo|echo-1": 0.01}, limits) is None
    scale = desired_slots([demand(6400, slack=5.0)], horizon_s=300, batch_s=BATCH_S, cap=cap)
    assert scale.desired == 5 and "rate limits" in scale.reason


# --- deadline pressure (deadline_risk) ---------------------------------------------------


def simulate_edf(work_s: list[float], jobs: list[tuple[float, float]], slots: int,
                 batch_s: float) -> list[float]:
    """Finish times of ``jobs`` (slack, work), earliest deadline first, after ``work_s``
    of higher classes, on ``slots`` slots sharing the work as a fluid."""
    done = sum(work_s)
    out = []
    for _, work in sorted(jobs):
        done += work
        out.append(done / slots + batch_s)
    return out


def test_a_class_whose_deadlines_the_slots_cannot_meet_has_pressure_above_one() -> None:
    # 200 jobs of 0.5 slot-seconds each, deadlines spread over the next 5 to 45 s, 2
    # slots: 100 s of work for 2 slots, the last deadline 45 s away.
    jobs = [(0.2 * i + 5.0, 0.5) for i in range(200)]
    risks = deadline_risks([0.0, 0.0, 100.0], [[], [], jobs], slots=2, batch_s=1.0,
                           inflight=0)
    assert risks[:2] == [None, None]
    risk = risks[2]
    assert risk is not None and risk.pressure > 1
    finish = simulate_edf([], jobs, 2, 1.0)
    late = [f > s for f, (s, _) in zip(finish, jobs, strict=True)]
    assert any(late)
    # ``need`` slots meet every deadline in the same fluid model; one fewer does not.
    assert all(f <= s for f, (s, _) in zip(simulate_edf([], jobs, risk.need, 1.0), jobs,
                                           strict=True))
    assert any(f > s for f, (s, _) in zip(simulate_edf([], jobs, risk.need - 1, 1.0), jobs,
                                          strict=True))


def test_enough_slots_leave_the_pressure_under_one() -> None:
    jobs = [(60.0 + i, 0.5) for i in range(40)]  # 20 slot-seconds, a minute of slack
    (risk,) = deadline_risks([20.0], [jobs], slots=4, batch_s=1.0, inflight=2)
    assert risk is not None and risk.pressure < 0.5 and risk.need <= 1


def test_the_work_of_higher_classes_and_in_flight_batches_comes_first() -> None:
    jobs = [(30.0, 1.0)]
    alone = deadline_risks([0.0, 1.0], [[], jobs], slots=1, batch_s=1.0, inflight=0)[1]
    behind = deadline_risks([60.0, 1.0], [[], jobs], slots=1, batch_s=1.0, inflight=3)[1]
    assert alone is not None and behind is not None
    assert alone.pressure < 1 < behind.pressure
    assert behind.projected_s == pytest.approx((3 * 1.0 + 60.0 + 1.0) / 1 + 1.0)


def test_class_deadlines_merge_the_groups_of_a_class_by_slack() -> None:
    groups = [(1, [(100.0 + i, 0) for i in range(0, 3000, 2)], 0.1),
              (1, [(100.0 + i, 0) for i in range(1, 3000, 2)], 0.3),
              (3, [(150.0, 0)], 1.0)]
    c0, c1, c2, c3 = class_deadlines(groups, now=100.0, classes=4)
    assert len(c0) == len(c2) == 0 and c3.tolist() == [[50.0, 1.0]]
    assert c1[:, 0].tolist() == [float(i) for i in range(3000)]
    assert c1[:4, 1].tolist() == [0.1, 0.3, 0.1, 0.3]
    assert c1[:, 1].sum() == pytest.approx(1500 * 0.1 + 1500 * 0.3)
    risks = deadline_risks([0.0, 600.0, 0.0, 1.0], [c0, c1, c2, c3], slots=4, batch_s=1.0,
                           inflight=0)
    assert risks[0] is None and risks[1] is not None and risks[3] is not None

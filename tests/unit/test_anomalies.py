"""Baselines and anomalies (pure, on a fake clock): robust to one outlier, slow to follow
a lasting change, silent before it has seen enough, quiet on steady noisy traffic, quick
on a real change, with hysteresis; stored and taken over by another scheduler."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from config.settings import Settings
from scheduler.anomalies import (
    Anomaly,
    BatchSeen,
    Calls,
    Change,
    Kind,
    Signal,
    Target,
    Watch,
    rules,
    tuning,
)
from scheduler.baselines import Baseline, Level, LevelTrack, Tuning, median_sigma

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]
DEP = "openai|m"
A, B = "10.0.0.5:8000/v1", "10.0.0.6:8000/v1"


def watch(**overrides: object) -> Watch:
    s = SETTINGS.model_copy(update=overrides) if overrides else SETTINGS
    return Watch(rules(s), tuning(s))


def seen(replica: str, size: int, seconds: float, *, errors: int = 0, requests: int = 0,
         cached: float = 0.8, ttft: float | None = None) -> BatchSeen:
    requests = requests or size
    return BatchSeen(DEP, replica, size, seconds, completion_tokens=32 * size,
                     prompt_tokens=400 * size, cached_tokens=int(400 * size * cached),
                     ttft_s=ttft, calls=(Calls(DEP, replica, requests, errors),))


#: ``(time, replica) -> factor on the batch's time`` of a scenario.
Slowdown = Callable[[float, str], float]


def run(w: Watch, *, until: float, seed: int = 7, slow: Slowdown = lambda t, r: 1.0,
        error_share: Callable[[float], float] = lambda t: 0.005,
        cached: Callable[[float], float] = lambda t: 0.8, every: float = 0.25,
        start: float = 0.0) -> list[tuple[float, Change]]:
    """Two replicas, a batch each every ``every`` seconds of mixed sizes, times with
    +-30% jitter and one call in 50 five times slower; ``step`` every second."""
    rng = random.Random(seed)
    changes: list[tuple[float, Change]] = []
    t = start
    next_step = start + 1.0
    while t < until:
        t += every
        for rep in (A, B):
            size = rng.choice((1, 2, 4, 8, 8, 16, 32, 32))
            factor = rng.uniform(0.7, 1.3) * (5.0 if rng.random() < 0.02 else 1.0)
            seconds = (0.05 + 0.012 * size) * factor * slow(t, rep)
            errs = sum(1 for _ in range(size) if rng.random() < error_share(t))
            w.batch(t, seen(rep, size, seconds, errors=errs,
                            cached=cached(t) * rng.uniform(0.9, 1.0)))
        if t >= next_step:  # the record as it was then (an active one is updated after)
            changes += [(t, Change(c.raised, Anomaly.load(c.anomaly.dump())))
                        for c in w.step(t)]
            next_step += 1.0
    return changes


def raised(changes: list[tuple[float, Change]]) -> list[tuple[float, Anomaly]]:
    return [(t, c.anomaly) for t, c in changes if c.raised]


def cleared(changes: list[tuple[float, Change]]) -> list[tuple[float, Anomaly]]:
    return [(t, c.anomaly) for t, c in changes if not c.raised]


def test_a_block_median_ignores_one_outlier_and_its_mad_is_unmoved() -> None:
    calm = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98]
    spiked = [*calm[:-1], 50.0]
    assert median_sigma(spiked)[0] == pytest.approx(median_sigma(calm)[0], abs=0.03)
    assert median_sigma(spiked)[1] == pytest.approx(median_sigma(calm)[1], rel=0.5)


@pytest.mark.parametrize("seed", range(5))
def test_ten_minutes_of_steady_noisy_traffic_raise_nothing(seed: int) -> None:
    # +-30% jitter, one call in 50 five times slower, sizes 1 to 32 mixed, 0.5% errors:
    # 4,800 batches of simulated time on each replica; a false alarm is the failure.
    w = watch()
    changes = run(w, until=600.0, seed=seed)
    assert raised(changes) == []
    track = w.tracks[(Signal.LATENCY, Target("openai", "m", A))]
    assert isinstance(track, LevelTrack) and track.verdict(600.0, w.tuning).level \
        is Level.INSIDE  # it was judging all along, not silent


def test_a_replica_five_times_slower_is_raised_within_30_s_and_clears_within_60_s() -> None:
    w = watch()
    changes = run(w, until=600.0, slow=lambda t, r: 5.0 if r == B and 300 <= t < 420 else 1.0)
    up = raised(changes)
    kinds = {(a.kind, a.replica) for _, a in up}
    assert (Kind.LATENCY_HIGH, B) in kinds and (Kind.THROUGHPUT_LOW, B) in kinds
    assert all(a.replica == B for _, a in up), up  # nothing on the healthy replica
    first = min(t for t, _ in up)
    assert 300 < first <= 330
    latency = next(a for _, a in up if a.kind == Kind.LATENCY_HIGH)
    assert latency.actual is not None and latency.expected is not None
    assert latency.actual / latency.expected > 3 and latency.severity == "critical"
    down = cleared(changes)
    assert {a.id for _, a in down} == {a.id for _, a in up}
    assert all(420 < t <= 480 for t, _ in down), down
    assert not w.active


def test_the_error_share_jumping_to_30_percent_raises_errors_high_on_the_deployment() -> None:
    w = watch()
    changes = run(w, until=420.0, error_share=lambda t: 0.3 if t >= 300 else 0.005)
    up = {(a.kind, a.replica): (t, a) for t, a in raised(changes)}
    t, a = up[(Kind.ERRORS_HIGH, "")]
    assert t <= 330 and a.actual is not None and 0.2 < a.actual < 0.4
    assert {k for k, _ in up} == {Kind.ERRORS_HIGH}


def test_a_collapsed_prefix_cache_raises_cache_hit_low() -> None:
    w = watch()
    changes = run(w, until=420.0, cached=lambda t: 0.1 if t >= 300 else 0.8)
    kinds = {(a.kind, a.signal, a.replica) for _, a in raised(changes)}
    assert (Kind.CACHE_HIT_LOW, Signal.PREFIX_CACHE, "") in kinds


def test_nothing_is_judged_before_the_minimum_of_samples() -> None:
    w = watch(anomaly_min_samples=200)
    # Slow from the first batch: there is no normal to be slower than.
    changes = run(w, until=30.0, slow=lambda t, r: 5.0 if t > 10 else 1.0)
    assert raised(changes) == []
    track = w.tracks[(Signal.LATENCY, Target("openai", "m", B))]
    assert track.verdict(30.0, w.tuning) .level is Level.UNKNOWN


def test_a_change_of_batch_sizes_is_not_a_change_of_speed() -> None:
    # Quiet hours send batches of 1, busy hours of 32: per output token of a request a
    # batch of 32 takes longer. Each size class has its own baseline.
    w = watch()
    rng = random.Random(3)
    t = 0.0
    changes: list[Change] = []
    while t < 900:
        t += 0.25
        size = rng.choice((1, 32)) if t < 600 else 32  # then only big batches
        w.batch(t, seen(A, size, (0.05 + 0.04 * size) * rng.uniform(0.7, 1.3)))
        if t % 1 == 0:
            changes += w.step(t)
    assert changes == []


def test_hysteresis_a_value_between_the_bands_neither_raises_nor_clears() -> None:
    w = watch()
    run(w, until=300.0, every=0.25)
    level: dict[str, float] = {"factor": 5.0}
    changes = run(w, until=360.0, start=300.0, seed=9,
                  slow=lambda t, r: level["factor"] if r == B else 1.0)
    on_b = (Kind.LATENCY_HIGH, B)
    assert on_b in {(a.kind, a.replica) for _, a in raised(changes)}
    level["factor"] = 1.7  # between the clear band (1.5x) and the raise band (2x)
    changes = run(w, until=480.0, start=360.0, seed=10,
                  slow=lambda t, r: level["factor"] if r == B else 1.0)
    assert on_b not in {(a.kind, a.replica) for _, a in cleared(changes)}
    changes = run(w, until=540.0, start=480.0, seed=11)  # back to normal: clears
    assert on_b in {(a.kind, a.replica) for _, a in cleared(changes)}


def test_a_lasting_change_becomes_the_new_normal_only_slowly() -> None:
    base = Baseline()
    t = Tuning()
    for _ in range(10):
        base.teach(0.0, 0.1, False, t)
    # A lasting change (log 1.6: five times) taught as beyond the band, block by block.
    blocks = 0
    while base.level < 0.7:  # until it is within the 2x band
        base.teach(1.6, 0.1, True, t)
        blocks += 1
    assert blocks > 40  # 40 blocks of 8: 320 observations at least
    fast = Baseline()
    for _ in range(10):
        fast.teach(0.0, 0.1, False, t)
    for _ in range(5):
        fast.teach(1.6, 0.1, False, t)
    assert fast.level > 0.7  # a normal block moves it at once


def test_baselines_and_active_anomalies_are_taken_over_by_a_new_scheduler() -> None:
    old = watch()
    changes = run(old, until=330.0, slow=lambda t, r: 5.0 if r == B and t >= 300 else 1.0)
    assert raised(changes)
    stored = old.dump_baselines()
    assert any(name.startswith(f"{Signal.LATENCY}|openai|m|{B}|") for name in stored)
    new = watch()
    assert new.load_baselines(stored) == len(stored)
    new.restore([Anomaly.load(a.dump()) for a in old.active.values()], now=330.0)
    assert set(new.active) == set(old.active)
    # It judges at once (no minimum of samples to wait for), and the anomaly clears
    # once the replica is back to normal.
    changes = run(new, until=420.0, start=330.0, seed=4)
    assert {a.id for _, a in cleared(changes)} == set(old.active)
    assert raised(changes) == []


def test_an_anomaly_whose_target_goes_silent_clears_after_stale_s() -> None:
    w = watch(anomaly_stale_s=60.0)
    run(w, until=330.0, slow=lambda t, r: 5.0 if r == B and t >= 300 else 1.0)
    assert w.active
    assert w.step(380.0) == []
    gone = w.step(400.0)
    assert gone and all("nothing observed" in c.anomaly.cleared_why for c in gone)


def test_deadline_pressure_raises_after_its_short_sustain_and_clears_with_hysteresis() -> None:
    w = watch()
    for t in range(0, 3):
        w.deadline(float(t), "normal", 1.5, 90.0, 60.0)
        assert w.step(float(t)) == []  # 2 s: not yet sustained
    w.deadline(3.0, "normal", 1.5, 90.0, 60.0)
    (change,) = w.step(3.0)
    a = change.anomaly
    assert change.raised and a.kind == Kind.DEADLINE_RISK and a.model == "normal"
    assert (a.provider, a.replica, a.actual, a.expected) == ("", "", 90.0, 60.0)
    for t in range(4, 40):
        w.deadline(float(t), "normal", 0.9, 54.0, 60.0)  # between 0.8 and 1: holds
        assert w.step(float(t)) == []
    for t in range(40, 61):
        w.deadline(float(t), "normal", 0.0, 0.0, 0.0)
        done = w.step(float(t))
    assert done and not done[0].raised


def test_errors_of_a_batch_keep_its_time_out_of_the_speed_baselines() -> None:
    w = watch()
    w.batch(1.0, seen(A, 8, 30.0, errors=3))  # retried with backoff: slow, but not speed
    assert (Signal.LATENCY, Target("openai", "m", A)) not in w.tracks
    assert (Signal.ERRORS, Target("openai", "m", A)) in w.tracks


def test_time_to_first_token_has_its_own_baseline() -> None:
    w = watch()
    rng = random.Random(5)
    changes: list[Change] = []
    for i in range(1, 1200):
        t = i * 0.25
        first = 0.2 * rng.uniform(0.7, 1.3) * (4.0 if t >= 200 else 1.0)
        w.batch(t, seen(A, 4, 1.0 * rng.uniform(0.9, 1.1), ttft=first))
        if i % 4 == 0:
            changes += w.step(t)
    assert sorted((c.anomaly.kind, c.anomaly.signal, c.anomaly.replica) for c in changes
                  if c.raised) == [(Kind.LATENCY_HIGH, Signal.TTFT, ""),
                                   (Kind.LATENCY_HIGH, Signal.TTFT, A)]

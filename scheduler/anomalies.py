"""Anomalies: a signal of a deployment, a replica or a class that stays beyond its
baseline's band. Pure: ``Watch`` takes observations and the time, and ``step(now)`` says
what was raised and what cleared; the scheduler (``scheduler.monitor``) reads the
observations from Redis, acts on the changes and stores them.

Kinds and their signals (``scheduler.signals``), each judged per target as
``scheduler.baselines`` says:

==================  =====================================================  ==============
kind                signals                                                targets
==================  =====================================================  ==============
``latency_high``    latency per output token; time to first token          deployment,
                                                                            replica
``throughput_low``  provider tokens per second                             deployment,
                                                                            replica
``errors_high``     share of requests failing transiently                  deployment,
                                                                            replica
``cache_hit_low``   prompt tokens from the prefix cache; jobs answered     deployment
                    from the exact cache (deployment only)                 (, replica)
``deadline_risk``   a class's projected time over its tightest slack       class
==================  =====================================================  ==============

A target is ``(provider, model, replica)``: ``replica`` is "" for the whole deployment
and the replica's address (``host:port/path``) for one replica; a class is
``("", class name, "")``. A signal beyond its band for ``sustain_s`` (deadlines:
``deadline_sustain_s``) is raised; an active anomaly clears once its signal stayed inside
the narrower clear band for ``clear_s`` (hysteresis), or when its target sent nothing for
``stale_s``. While it is active its baseline follows only slowly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from scheduler.baselines import (
    Baseline,
    DeadlineTrack,
    Level,
    LevelTrack,
    Reading,
    Rule,
    ShareTrack,
    Track,
    Tuning,
    size_class,
)
from scheduler.signals import (
    MIN_BATCH_S,
    BatchSeen,
    Calls,
    Kind,
    Signal,
    Target,
    rules,
    tuning,
)

__all__ = ["Anomaly", "BatchSeen", "Calls", "Change", "Kind", "Signal", "Target", "Watch",
           "format_value", "rules", "tuning"]

#: A track's key: its signal and target.
Key = tuple[str, Target]


@dataclass
class Anomaly:
    """One anomaly: what, where, how bad, the baseline's value and the value seen."""

    kind: str
    signal: str
    provider: str
    model: str
    replica: str
    severity: str
    expected: float | None
    actual: float | None
    unit: str
    raised_at: float
    updated_at: float
    cleared_at: float | None = None
    cleared_why: str = ""
    #: What was done about it (``scheduler.monitor``), for the record.
    actions: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return "|".join((self.kind, self.signal, self.provider, self.model, self.replica))

    @property
    def labels(self) -> tuple[str, str, str, str]:
        """``(kind, provider, model, replica)``, the metrics' labels."""
        return self.kind, self.provider, self.model, self.replica

    @property
    def where(self) -> str:
        if not self.provider:
            return f"class {self.model}"
        name = f"{self.provider}|{self.model}"
        return f"{name}@{self.replica}" if self.replica else name

    def describe(self) -> str:
        """One line for the log and ``status``."""
        head = f"{self.kind} ({self.severity}) on {self.where}"
        if self.kind == Kind.DEADLINE_RISK:
            return (f"{head}: its pending work takes {format_value(self.actual, 's')} at "
                    f"the current worker slots, its tightest deadline is "
                    f"{format_value(self.expected, 's')} away")
        return (f"{head}: {self.signal} {format_value(self.actual, self.unit)}, baseline "
                f"{format_value(self.expected, self.unit)}")

    def dump(self) -> str:
        """JSON, with its ``id``."""
        return json.dumps({"id": self.id, **asdict(self)})

    @classmethod
    def load(cls, raw: str | bytes) -> Anomaly:
        data = json.loads(raw)
        data.pop("id", None)
        return cls(**data)


def format_value(value: float | None, unit: str) -> str:
    """A value of a signal as a person reads it."""
    if value is None:
        return "-"
    if unit == "share":
        return f"{value:.1%}"
    if unit in ("s", "s/token"):
        per = "/token" if unit == "s/token" else ""
        return f"{value * 1000:.1f} ms{per}" if value < 1 else f"{value:.2f} s{per}"
    return f"{value:.1f} {unit}"


@dataclass
class _State:
    outside_since: float | None = None
    inside_since: float | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """An anomaly raised (``raised``) or cleared."""

    raised: bool
    anomaly: Anomaly


def _target(deployment: str, replica: str = "") -> Target:
    provider, _, model = deployment.partition("|")
    return Target(provider, model, replica)


class Watch:
    """Every track, its state, and the anomalies active now (see the module)."""

    def __init__(self, rules_: dict[str, Rule], tuning_: Tuning) -> None:
        self.rules = rules_
        self.tuning = tuning_
        self.tracks: dict[Key, Track] = {}
        self._states: dict[Key, _State] = {}
        #: Active anomalies by id.
        self.active: dict[str, Anomaly] = {}

    # --- observations -------------------------------------------------------------------

    def _track(self, signal: str, target: Target) -> Track:
        key = (signal, target)
        found = self.tracks.get(key)
        if found is None:
            rule = self.rules[signal]
            found = (DeadlineTrack(rule, self.tuning) if signal == Signal.DEADLINE else
                     ShareTrack(rule, self.tuning) if rule.pooled else
                     LevelTrack(rule, self.tuning))
            self.tracks[key] = found
        return found

    def _held(self, signal: str, target: Target) -> bool:
        rule = self.rules[signal]
        return "|".join((rule.kind, signal, *target)) in self.active

    def _level(self, now: float, signal: str, target: Target, value: float, size: int) -> None:
        track = self._track(signal, target)
        assert isinstance(track, LevelTrack)
        track.observe(now, value, size_class(size), self.tuning, self._held(signal, target))

    def _share(self, now: float, signal: str, target: Target, num: float, den: float) -> None:
        track = self._track(signal, target)
        assert isinstance(track, ShareTrack)
        track.observe(now, num, den, self.tuning, self._held(signal, target))

    def batch(self, now: float, seen: BatchSeen) -> None:
        """One batch's end."""
        targets = [_target(seen.deployment)]
        if seen.replica:
            targets.append(_target(seen.deployment, seen.replica))
        failed = {(c.deployment, c.replica) for c in seen.calls if c.errors}
        for c in seen.calls:
            for t in ([_target(c.deployment)] if not c.replica else
                      [_target(c.deployment), _target(c.deployment, c.replica)]):
                self._share(now, Signal.ERRORS, t, c.errors, c.requests)
        speed = (seen.seconds is not None and seen.seconds >= MIN_BATCH_S
                 and seen.completion_tokens > 0
                 and (seen.deployment, seen.replica) not in failed)
        for t in targets:
            if speed:
                assert seen.seconds is not None
                per_request = seen.completion_tokens / max(1, seen.size)
                self._level(now, Signal.LATENCY, t, seen.seconds / per_request, seen.size)
                self._level(now, Signal.TOKENS, t, seen.completion_tokens / seen.seconds,
                            seen.size)
            if seen.ttft_s is not None and seen.ttft_s > 0:
                self._level(now, Signal.TTFT, t, seen.ttft_s, seen.size)
            if seen.prompt_tokens > 0:
                self._share(now, Signal.PREFIX_CACHE, t, seen.cached_tokens,
                            seen.prompt_tokens)

    def exact_cache(self, now: float, deployment: str, hits: int, submitted: int) -> None:
        """Jobs of a deployment answered without a call of their own, of those submitted,
        since the last call."""
        if submitted > 0:
            self._share(now, Signal.EXACT_CACHE, _target(deployment), min(hits, submitted),
                        submitted)

    def deadline(self, now: float, cls: str, pressure: float, projected_s: float,
                 slack_s: float) -> None:
        """A class's deadline pressure now (0 with no deadline pending)."""
        target = Target("", cls, "")
        track = self._track(Signal.DEADLINE, target)
        assert isinstance(track, DeadlineTrack)
        track.observe(now, pressure, projected_s, slack_s, self.tuning,
                      self._held(Signal.DEADLINE, target))

    # --- judging ------------------------------------------------------------------------

    def step(self, now: float) -> list[Change]:
        """Judge every track; what was raised and what cleared."""
        changes: list[Change] = []
        t = self.tuning
        for key, track in self.tracks.items():
            signal, target = key
            rule = self.rules[signal]
            reading = track.verdict(now, t)
            aid = "|".join((rule.kind, signal, *target))
            state = self._states.setdefault(key, _State())
            found = self.active.get(aid)
            if found is None:
                if reading.level is not Level.OUTSIDE:
                    state.outside_since = None
                    continue
                if state.outside_since is None:
                    state.outside_since = now
                sustain = t.deadline_sustain_s if rule.kind == Kind.DEADLINE_RISK else \
                    t.sustain_s
                if now - state.outside_since >= sustain:
                    found = Anomaly(rule.kind, signal, *target,
                                    severity="critical" if reading.critical else "warning",
                                    expected=_round(reading.expected),
                                    actual=_round(reading.actual), unit=rule.unit,
                                    raised_at=now, updated_at=now)
                    self.active[aid] = found
                    state.inside_since = None
                    changes.append(Change(True, found))
                continue
            cleared = self._follow(found, reading, state, track, now)
            if cleared:
                changes.append(Change(False, found))
                del self.active[aid]
                state.outside_since = None
        return changes

    def _follow(self, found: Anomaly, reading: Reading, state: _State, track: Track,
                now: float) -> bool:
        """Update an active anomaly with the latest reading; whether it cleared."""
        t = self.tuning
        if reading.actual is not None:
            found.actual = _round(reading.actual)
            found.expected = _round(reading.expected)
            found.updated_at = now
            if reading.critical:
                found.severity = "critical"
        if reading.level is Level.INSIDE:
            if state.inside_since is None:
                state.inside_since = now
            if now - state.inside_since >= t.clear_s:
                found.cleared_at, found.cleared_why = now, (
                    f"back inside its band for {t.clear_s:g} s")
                return True
        elif reading.level is Level.UNKNOWN:
            if now - track.last_seen >= t.stale_s:
                found.cleared_at, found.cleared_why = now, (
                    f"nothing observed for {t.stale_s:g} s")
                return True
        else:
            state.inside_since = None
        return False

    # --- what the actions and the record need -------------------------------------------

    def of_kind(self, *kinds: str) -> list[Anomaly]:
        return [a for a in self.active.values() if a.kind in kinds]

    def restore(self, anomalies: Iterable[Anomaly], now: float) -> None:
        """Anomalies a previous scheduler left active: they stay active (their actions
        apply again) until their signal clears, or nothing is seen for ``stale_s``."""
        for a in anomalies:
            if a.signal not in self.rules:
                continue
            self.active[a.id] = a
            track = self._track(a.signal, Target(a.provider, a.model, a.replica))
            track.last_seen = max(track.last_seen, now)

    def dump_baselines(self, since: float = 0.0) -> dict[str, str]:
        """``signal|provider|model|replica|size class`` -> JSON, of the baselines taught
        after ``since``."""
        out: dict[str, str] = {}
        for (signal, target), track in self.tracks.items():
            for cls, base in track.baselines().items():
                if base.samples and base.at > since:
                    out["|".join((signal, *target, str(cls)))] = json.dumps(base.dump())
        return out

    def load_baselines(self, stored: dict[str, str]) -> int:
        """Baselines a previous scheduler stored; how many were taken."""
        taken = 0
        for name, raw in stored.items():
            parts = str(name).split("|")
            if len(parts) != 5 or parts[0] not in self.rules:
                continue
            signal, provider, model, replica, cls = parts
            try:
                base = Baseline.load(json.loads(raw))
                n = int(cls)
            except (ValueError, KeyError, TypeError):
                continue
            track = self._track(signal, Target(provider, model, replica))
            if isinstance(track, LevelTrack):
                track.by_class[n] = base
            elif isinstance(track, ShareTrack | DeadlineTrack):
                track.base = base
            taken += 1
        return taken


def _round(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return float(f"{value:.4g}")

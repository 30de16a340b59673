"""Learned baselines: what is normal for one signal of one deployment or replica, and how
far the last observations are from it. Pure: observations and the time come in, readings
go out; no Redis, no clock.

A **baseline** is taught a block of observations at a time: a block closes once it holds
at least ``Tuning.window`` observations and spans ``Tuning.block_s`` seconds (so the pace
of learning is set by time, not by traffic: a busy deployment sends many observations a
second). The block's median moves the baseline's ``level`` and its robust sigma (1.4826 x
its median absolute deviation) moves its ``spread``, both by an EWMA. A single outlier
moves a block's median little and its MAD not at all. A block whose median lies beyond
the band (or any block while the signal's anomaly is active) teaches with the slow
``alpha_out`` instead of ``alpha_in``: a lasting change becomes the new normal slowly
(with the defaults, 10 s blocks and 0.01, it takes about ten minutes for a fivefold
change to come within the 2x band), instead of hiding the anomaly it is. The first
blocks are averaged (``1/blocks`` while that is larger than ``alpha_in``), and nothing is
judged before ``min_samples`` observations.

Two kinds of signal (``Rule.pooled``):

* **levels** (latency per output token, time to first token, tokens/s): judged on a log
  scale (a slowdown is a factor), with one baseline per batch-size class (``size_class``:
  a batch of 32 takes longer per job than a batch of 1, so a change of load is not a
  change of speed). An observation is judged against its own class's baseline. A
  reading is the median over the last ``window`` observations within ``window_s``: it is
  beyond the band when its median z-score passes ``band_k`` sigmas *and* its median
  ratio to the baseline passes the rule's factor (both, so that neither a very steady nor
  a very noisy signal raises on a small change); back inside when either is within half.
* **shares** (error ratio, cache hit ratios): numerators and denominators pooled over the
  window (a batch of one request says little), against the baseline's share with a floor
  and a margin (a share that is usually 0 has no spread to speak of).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

#: 1.4826 x MAD estimates the standard deviation of normally distributed values.
MAD_SIGMA = 1.4826
#: The least spread of a level signal, on its log scale (5%): a signal that never varied
#: must not raise on a tiny change.
MIN_SPREAD = 0.05
#: The least observations in a reading.
MIN_FRESH = 3


class Level(StrEnum):
    """Where a reading lies against its baseline."""

    #: Beyond the band: counts toward raising.
    OUTSIDE = "outside"
    #: Between the band and the narrower clear band: neither raises nor clears.
    BETWEEN = "between"
    #: Inside the clear band: counts toward clearing.
    INSIDE = "inside"
    #: Too few recent observations, or no mature baseline: no judgment.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Rule:
    """How one signal is judged.

    ``high``: an anomaly is a value above the baseline (else below). Levels: ``factor``
    is the least ratio to the baseline (above 1 for high, below 1 for low). Shares:
    high: ``factor`` is the least share, and ``margin`` the least excess over the
    baseline's; low: ``factor`` is the most fraction of the baseline, judged only when the
    baseline is at least ``min_level``, with ``margin`` the least shortfall; ``min_den``
    is the least pooled denominator of a reading.
    """

    signal: str
    kind: str
    unit: str
    high: bool
    pooled: bool
    factor: float
    margin: float = 0.0
    min_level: float = 0.0
    min_den: float = 0.0


@dataclass(frozen=True, slots=True)
class Tuning:
    """How fast baselines learn and how long a reading must last."""

    window: int = 8
    block_s: float = 10.0
    window_s: float = 30.0
    min_samples: int = 24
    sustain_s: float = 10.0
    clear_s: float = 20.0
    stale_s: float = 300.0
    deadline_sustain_s: float = 3.0
    band_k: float = 3.0
    alpha_in: float = 0.2
    alpha_out: float = 0.01


@dataclass(frozen=True, slots=True)
class Reading:
    """A judgment of the latest observations: where they lie, the value seen (``actual``)
    and the baseline's (``expected``), and how bad it is."""

    level: Level
    actual: float | None = None
    expected: float | None = None
    critical: bool = False


UNKNOWN = Reading(Level.UNKNOWN)


@dataclass
class Baseline:
    """What is normal: ``level`` (an EWMA of block medians, of logs for a level signal)
    and ``spread`` (an EWMA of the blocks' robust sigmas), from ``samples`` observations
    in ``blocks`` blocks, last taught at ``at``."""

    level: float = 0.0
    spread: float = 0.0
    samples: int = 0
    blocks: int = 0
    at: float = 0.0

    def mature(self, tuning: Tuning) -> bool:
        return self.blocks > 0 and self.samples >= tuning.min_samples

    def teach(self, centre: float, sigma: float, slow: bool, tuning: Tuning) -> None:
        """One block's median (``centre``) and robust sigma; ``slow``: it lay beyond the
        band, or its anomaly is active."""
        self.blocks += 1
        if self.blocks == 1:
            self.level, self.spread = centre, sigma
            return
        a = tuning.alpha_out if slow else max(tuning.alpha_in, 1.0 / self.blocks)
        self.level += a * (centre - self.level)
        self.spread += a * (sigma - self.spread)

    def dump(self) -> dict[str, Any]:
        return {"level": round(self.level, 6), "spread": round(self.spread, 6),
                "samples": self.samples, "blocks": self.blocks, "at": round(self.at, 3)}

    @classmethod
    def load(cls, data: dict[str, Any]) -> Baseline:
        return cls(level=float(data["level"]), spread=float(data["spread"]),
                   samples=int(data["samples"]), blocks=int(data["blocks"]),
                   at=float(data.get("at", 0.0)))


def median_sigma(values: Sequence[float]) -> tuple[float, float]:
    """The median of ``values`` and their robust sigma (1.4826 x MAD)."""
    centre = statistics.median(values)
    return centre, MAD_SIGMA * statistics.median(abs(v - centre) for v in values)


def size_class(size: int) -> int:
    """A batch's size class: 1, 2-3, 4-7, 8-15, ... (its bit length)."""
    return max(1, size).bit_length()


class Track:
    """One signal of one target: its baselines and its latest observations."""

    rule: Rule
    last_seen: float = 0.0

    def verdict(self, now: float, tuning: Tuning) -> Reading:
        raise NotImplementedError

    def baselines(self) -> dict[int, Baseline]:
        raise NotImplementedError


class LevelTrack(Track):
    """A level signal (log scale), with a baseline per batch-size class."""

    def __init__(self, rule: Rule, tuning: Tuning) -> None:
        self.rule = rule
        self.by_class: dict[int, Baseline] = {}
        #: Per size class: the block under way (its start, its values).
        self._blocks: dict[int, tuple[float, list[float]]] = {}
        #: (time, value, expected value, z-score) of the latest judged observations.
        self.recent: deque[tuple[float, float, float, float]] = deque(maxlen=tuning.window)

    def observe(self, now: float, value: float, cls: int, tuning: Tuning,
                held: bool = False) -> None:
        """One observation (a batch's value) of size class ``cls``; ``held``: the
        signal's anomaly is active (the baseline then follows only slowly)."""
        if not value > 0 or math.isinf(value):
            return
        x = math.log(value)
        base = self.by_class.setdefault(cls, Baseline())
        mature = base.mature(tuning)
        if mature:
            z = (x - base.level) / max(base.spread, MIN_SPREAD)
            self.recent.append((now, value, math.exp(base.level), z))
        self.last_seen = now
        base.samples += 1
        base.at = now
        began, block = self._blocks.setdefault(cls, (now, []))
        block.append(x)
        if len(block) >= tuning.window and now - began >= tuning.block_s:
            centre, sigma = median_sigma(block)
            beyond = mature and self._beyond(centre - base.level,
                                             max(base.spread, MIN_SPREAD), tuning)
            base.teach(centre, sigma, held or beyond, tuning)
            del self._blocks[cls]

    def _beyond(self, dx: float, spread: float, tuning: Tuning) -> bool:
        sign = 1.0 if self.rule.high else -1.0
        return (sign * dx / spread >= tuning.band_k
                and sign * dx >= sign * math.log(self.rule.factor))

    def verdict(self, now: float, tuning: Tuning) -> Reading:
        fresh = [o for o in self.recent if o[0] >= now - tuning.window_s]
        if len(fresh) < MIN_FRESH:
            return UNKNOWN
        z = statistics.median(o[3] for o in fresh)
        ratio = statistics.median(o[1] / o[2] for o in fresh)
        actual = statistics.median(o[1] for o in fresh)
        expected = statistics.median(o[2] for o in fresh)
        k, f = tuning.band_k, self.rule.factor
        clear_f = (1.0 + f) / 2.0  # halfway back: 1.5 for 2.0, 0.75 for 0.5
        if self.rule.high:
            out, back, critical = z >= k and ratio >= f, z < k / 2 or ratio < clear_f, \
                ratio >= f * f
        else:
            out, back, critical = z <= -k and ratio <= f, z > -k / 2 or ratio > clear_f, \
                ratio <= f * f
        level = Level.OUTSIDE if out else Level.INSIDE if back else Level.BETWEEN
        return Reading(level, actual, expected, critical)

    def baselines(self) -> dict[int, Baseline]:
        return self.by_class


class ShareTrack(Track):
    """A share (errors / requests, cached / prompt tokens), pooled over the window."""

    def __init__(self, rule: Rule, tuning: Tuning) -> None:
        self.rule = rule
        self.base = Baseline()
        #: (time, numerator, denominator) of the latest judged observations.
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=tuning.window)
        self._num = 0.0
        self._den = 0.0
        self._n = 0
        self._began: float | None = None

    def observe(self, now: float, num: float, den: float, tuning: Tuning,
                held: bool = False) -> None:
        if not den > 0:
            return
        mature = self.base.mature(tuning)
        if mature:
            self.recent.append((now, num, den))
        self.last_seen = now
        self.base.samples += 1
        self.base.at = now
        self._num += num
        self._den += den
        self._n += 1
        if self._began is None:
            self._began = now
        if self._n >= tuning.window and now - self._began >= tuning.block_s:
            share = self._num / self._den
            beyond = mature and self._judge(share, self.base.level)[0]
            self.base.teach(share, 0.0, held or beyond, tuning)
            self._num = self._den = 0.0
            self._n = 0
            self._began = None

    def _judge(self, actual: float, expected: float) -> tuple[bool, bool, bool]:
        """(beyond the band, inside the clear band, critical)."""
        r = self.rule
        if r.high:
            line = max(r.factor, expected + r.margin)
            back = max(r.factor / 2, expected + r.margin / 2)
            return actual >= line, actual < back, actual >= max(0.5, 2 * line)
        if expected < r.min_level:
            return False, True, False
        line = min(expected * r.factor, expected - r.margin)
        back = expected * (1.0 + r.factor) / 2.0
        return actual <= line, actual > back, actual <= expected * r.factor / 2

    def verdict(self, now: float, tuning: Tuning) -> Reading:
        fresh = [o for o in self.recent if o[0] >= now - tuning.window_s]
        den = sum(o[2] for o in fresh)
        if len(fresh) < MIN_FRESH or den < self.rule.min_den:
            return UNKNOWN
        actual = sum(o[1] for o in fresh) / den
        expected = self.base.level
        out, back, critical = self._judge(actual, expected)
        level = Level.OUTSIDE if out else Level.INSIDE if back else Level.BETWEEN
        return Reading(level, actual, expected, critical)

    def baselines(self) -> dict[int, Baseline]:
        return {0: self.base}


class DeadlineTrack(Track):
    """A class's deadline pressure: the time its pending work is projected to take at the
    current worker slots, over the slack of the deadline it is tightest against (above 1:
    a deadline will be missed unless more slots come). Not learned: ``rule.factor`` (1)
    is the line; back inside under ``CLEAR`` of it. The baseline (an EWMA of the
    pressure) is kept for what is normal, and shown."""

    #: Back inside under this pressure.
    CLEAR = 0.8

    def __init__(self, rule: Rule, tuning: Tuning) -> None:
        self.rule = rule
        self.base = Baseline()
        #: (time, pressure, projected seconds, slack seconds) of the latest observation.
        self.latest: tuple[float, float, float, float] | None = None
        self._block: list[float] = []
        self._began = 0.0

    def observe(self, now: float, pressure: float, projected_s: float, slack_s: float,
                tuning: Tuning, held: bool = False) -> None:
        self.latest = (now, pressure, projected_s, slack_s)
        self.last_seen = now
        self.base.samples += 1
        self.base.at = now
        if not self._block:
            self._began = now
        self._block.append(pressure)
        if len(self._block) >= tuning.window and now - self._began >= tuning.block_s:
            centre, sigma = median_sigma(self._block)
            self.base.teach(centre, sigma, held or centre >= 1.0, tuning)
            self._block.clear()

    def verdict(self, now: float, tuning: Tuning) -> Reading:
        if self.latest is None or self.latest[0] < now - 5.0:
            return UNKNOWN
        _, pressure, projected, slack = self.latest
        level = (Level.OUTSIDE if pressure >= self.rule.factor else
                 Level.INSIDE if pressure < self.CLEAR else Level.BETWEEN)
        return Reading(level, round(projected, 3), round(slack, 3), pressure >= 2.0)

    def baselines(self) -> dict[int, Baseline]:
        return {0: self.base}

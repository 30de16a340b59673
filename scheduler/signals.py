"""What the scheduler measures of its deployments, replicas and classes: the signals, the
kinds of anomaly they raise, their rules and the observations a batch's end brings. Pure
(``scheduler.anomalies`` judges them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from config.settings import Settings
from scheduler.baselines import Rule, Tuning

#: A batch shorter than this says nothing of a provider's speed (the worker's own
#: overhead is of this order), in seconds.
MIN_BATCH_S = 0.02


class Kind(StrEnum):
    """What kind of anomaly."""

    #: Latency per output token or time to first token well above the baseline.
    LATENCY_HIGH = "latency_high"
    #: Provider tokens per second well below the baseline.
    THROUGHPUT_LOW = "throughput_low"
    #: Requests failing transiently well above the baseline's share.
    ERRORS_HIGH = "errors_high"
    #: Prefix or exact cache hits well below the baseline's share.
    CACHE_HIT_LOW = "cache_hit_low"
    #: A class's pending work projected past one of its deadlines at the current slots.
    DEADLINE_RISK = "deadline_risk"


class Signal(StrEnum):
    """What is measured."""

    #: Seconds per output token of one request (a batch's time over its requests'
    #: mean completion tokens).
    LATENCY = "latency_per_token"
    #: Seconds from a streamed request's start to its first text.
    TTFT = "ttft"
    #: Completion tokens per second of a batch.
    TOKENS = "tokens_per_s"
    #: Requests that failed transiently (5xx, 429, timeouts, resets, cut-off bodies) over
    #: requests sent.
    ERRORS = "error_ratio"
    #: Prompt tokens served from the provider's prefix cache over prompt tokens.
    PREFIX_CACHE = "prefix_cache_ratio"
    #: Jobs answered from the exact (or semantic) cache, or coalesced, over jobs submitted.
    EXACT_CACHE = "exact_cache_ratio"
    #: Projected time of a class's pending work over the slack of its tightest deadline.
    DEADLINE = "deadline_pressure"


def rules(settings: Settings) -> dict[str, Rule]:
    """Each signal's rule, with the thresholds of ``settings``."""
    s = settings
    latency, throughput = s.anomaly_latency_ratio, s.anomaly_throughput_ratio
    cache = s.anomaly_cache_ratio
    return {r.signal: r for r in (
        Rule(Signal.LATENCY, Kind.LATENCY_HIGH, "s/token", True, False, latency),
        Rule(Signal.TTFT, Kind.LATENCY_HIGH, "s", True, False, latency),
        Rule(Signal.TOKENS, Kind.THROUGHPUT_LOW, "tokens/s", False, False, throughput),
        Rule(Signal.ERRORS, Kind.ERRORS_HIGH, "share", True, True, s.anomaly_error_ratio,
             margin=s.anomaly_error_ratio, min_den=10),
        Rule(Signal.PREFIX_CACHE, Kind.CACHE_HIT_LOW, "share", False, True, cache,
             margin=0.05, min_level=0.1, min_den=256),
        Rule(Signal.EXACT_CACHE, Kind.CACHE_HIT_LOW, "share", False, True, cache,
             margin=0.05, min_level=0.1, min_den=20),
        Rule(Signal.DEADLINE, Kind.DEADLINE_RISK, "s", True, False, 1.0),
    )}


def tuning(settings: Settings) -> Tuning:
    """The timing of ``settings``."""
    s = settings
    return Tuning(window=s.anomaly_window, window_s=s.anomaly_window_s,
                  min_samples=s.anomaly_min_samples, sustain_s=s.anomaly_sustain_s,
                  clear_s=s.anomaly_clear_s, stale_s=s.anomaly_stale_s,
                  deadline_sustain_s=s.anomaly_deadline_sustain_s)


class Target(NamedTuple):
    """What a signal is of: a deployment (``replica`` ""), a replica, or a class
    (``("", class name, "")``)."""

    provider: str
    model: str
    replica: str = ""


@dataclass(frozen=True, slots=True)
class Calls:
    """Requests a batch sent to one deployment (one replica of it, if it has several),
    and how many failed transiently."""

    deployment: str
    replica: str
    requests: int
    errors: int


@dataclass(frozen=True, slots=True)
class BatchSeen:
    """What one batch's end tells: where it ran (``deployment`` ``provider|model`` and
    ``replica``, "" if none), its size and time, its tokens, the time to first token of
    its streamed requests (median) and its requests per deployment and replica."""

    deployment: str
    replica: str
    size: int
    seconds: float | None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    calls: tuple[Calls, ...] = ()

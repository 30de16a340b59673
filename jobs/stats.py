"""The cluster's job counters, kept in Redis by the steps that accept and finish jobs.

A job is counted as submitted in the Lua step that publishes it to intake, and as
finished in the Lua step that stores its result (first wins): once each, whichever
process did it, a Python client as well as the API. ``pb:stats`` holds the totals (for
Prometheus counters); ``pb:recent:{bucket}`` holds 10-second buckets of the last few
minutes (for rates in ``promptbatch status``). Only the active scheduler exports them, so
they are never counted twice across instances.

The fields are written in one place, the Lua helpers of ``jobs/lua/_count.lua`` (which
lists them), and read here; Python only builds their ``tenant|provider|model`` label.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from config import keys
from config.settings import PRIORITY_NAMES

#: Width of one recent bucket, in seconds, and how long a bucket is kept.
BUCKET_S = 10
BUCKET_TTL_S = 300


@functools.lru_cache(maxsize=4096)
def label(tenant: str, provider: str | None, model: str | None) -> str:
    """The ``tenant|provider|model`` part of a counter's field ('|' inside a value is
    written '/', so the field splits back unambiguously)."""
    return "|".join((v or "").replace("|", "/") for v in (tenant, provider, model))


def money_fields(tenant: str, provider: str | None, model: str | None, cost: float | None,
                 saved: Mapping[str, float]) -> str:
    """What a job spent and saved, as the lines ``finish_many`` adds to the stats hash:
    ``$|tenant|provider|model`` and ``v|reason|tenant``, each with US dollars ('' for
    nothing; amounts of 0 are left out)."""
    lines = []
    if cost:
        lines.append(f"$|{label(tenant, provider, model)}\t{cost!r}")
    t = (tenant or "").replace("|", "/")
    lines += [f"v|{reason}|{t}\t{usd!r}" for reason, usd in saved.items() if usd]
    return "\n".join(lines)


@dataclass(frozen=True)
class Money:
    """Money counted in the stats hash: spent (``reason`` '') per tenant and deployment,
    or saved per tenant and reason."""

    tenant: str
    provider: str
    model: str
    reason: str
    usd: float


def read_money(r: redis.Redis) -> tuple[list[Money], list[Money]]:
    """What was spent and saved, from ``pb:stats`` (since it began)."""
    raw: dict[str, str] = r.hgetall(keys.STATS)  # type: ignore[assignment]
    spent: list[Money] = []
    saved: list[Money] = []
    for name, value in raw.items():
        parts = str(name).split("|")
        if parts[0] == "$" and len(parts) == 4:
            spent.append(Money(parts[1], parts[2], parts[3], "", float(value)))
        elif parts[0] == "v" and len(parts) == 3:
            saved.append(Money(parts[2], "", "", parts[1], float(value)))
    return spent, saved


def bucket_of(now: float) -> int:
    """The recent bucket that ``now`` falls in."""
    return int(now // BUCKET_S)


def class_name(raw: str) -> str:
    """A class as the metrics name it: ``critical`` ... ``bulk`` (``unknown`` if unset)."""
    try:
        return PRIORITY_NAMES[int(raw)]
    except (ValueError, IndexError):
        return "unknown"


@dataclass(frozen=True)
class Count:
    """One counter: its kind (submitted, finished, missed), labels and value."""

    kind: str
    state: str
    cls: str
    tenant: str
    provider: str
    model: str
    value: int


def read_totals(r: redis.Redis) -> list[Count]:
    """Every counter in ``pb:stats``."""
    raw: dict[str, str] = r.hgetall(keys.STATS)  # type: ignore[assignment]
    out: list[Count] = []
    for name, value in raw.items():
        parts = str(name).split("|")
        kind = parts[0]
        if kind in ("f", "c") and len(parts) == 6:
            _, state, cls, tenant, provider, model = parts
        elif kind in ("s", "m") and len(parts) == 5:
            _, cls, tenant, provider, model = parts
            state = ""
        else:
            continue
        out.append(Count({"s": "submitted", "f": "finished", "m": "missed",
                          "c": "cache"}[kind], state,
                         class_name(cls), tenant, provider, model, int(value)))
    return out


@dataclass
class Recent:
    """What happened per class over the last ``window_s`` seconds."""

    window_s: float
    submitted: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    finished: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    missed: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def finished_in(self, cls: str) -> int:
        """Jobs of ``cls`` finished in the window, in any state."""
        return sum(self.finished.get(cls, {}).values())

    @property
    def throughput(self) -> float:
        """Jobs finished per second over the window."""
        return sum(self.finished_in(c) for c in self.finished) / self.window_s


def read_recent(r: redis.Redis, now: float, window_s: int = 60) -> Recent:
    """Counters of the last ``window_s`` seconds (whole buckets: the current one and the
    ones before it)."""
    last = bucket_of(now)
    n = max(1, window_s // BUCKET_S)
    buckets = _fetch(r, [keys.recent(b) for b in range(last - n + 1, last + 1)])
    out = Recent(window_s=float(window_s))
    for bucket in buckets:
        for name, value in bucket.items():
            parts = str(name).split("|")
            if parts[0] == "s" and len(parts) == 2:
                out.submitted[class_name(parts[1])] += int(value)
            elif parts[0] == "f" and len(parts) == 3:
                out.finished[class_name(parts[2])][parts[1]] += int(value)
            elif parts[0] == "m" and len(parts) == 2:
                out.missed[class_name(parts[1])] += int(value)
    return out


def _fetch(r: redis.Redis, names: list[str]) -> list[dict[str, str]]:
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    return list(pipe.execute())

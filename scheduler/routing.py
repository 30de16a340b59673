"""Cache-aware routing of whole batches over a replica set (a provider's replicas). Pure.

A replica's prefix cache holds what it computed recently, oldest out first. The router
keeps, per replica, an approximate record of the same: the prefix families (``family_of``:
the first 256 characters, one system prompt or template) of the batches it sent there,
each with its prefix's tokens, bounded by the replica's cache size (``cache_tokens``),
oldest out first. A batch goes to the replica that holds its family, unless that
replica's outstanding work is well above the least loaded one's; then to the least
loaded, which from then on holds the family too. Outstanding work is the scheduler's
estimate of each batch in flight there, scaled by what the replica has shown (the ratio
of its measured to its estimated times, learned per replica) and divided by its weight.

Why in the scheduler: it knows each batch's family and estimated work before anything is
sent, and every batch in flight; a request-level router sees one request at a time. The
worker is told the order of replicas to try (the chosen one first); it skips a replica
that is cooling down or fails, so the scheduler need not know health to the second.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from config import keys
from config.settings import Settings
from scheduler.pool import PendingJob, family_of

#: Characters per token, as the scheduler estimates them.
CHARS_PER_TOKEN = 4
#: A slowed replica's probes are at least this many times its own (learned) batch time
#: apart, so that they hold at most a fifth of a worker slot however slow it is.
PROBE_GAP = 4.0


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One replica of a deployment: its address, weight and prefix cache (tokens)."""

    name: str
    weight: float = 1.0
    cache_tokens: int = 100_000


@dataclass(frozen=True, slots=True)
class RoutingRules:
    """When affinity gives way to load.

    The replica holding a batch's family keeps it while its outstanding work is at most
    ``imbalance_batches`` batches (of this batch's estimate) and ``imbalance_s`` seconds
    above the least loaded replica's (whichever is larger), unless the least loaded one
    is nearly idle (less than ``idle_batches`` batches of work) while the holder has more:
    capacity left idle costs more than a prefix computed again. ``latency_alpha`` is the
    weight of each new measurement in a replica's learned ratio."""

    imbalance_batches: float = 4.0
    imbalance_s: float = 0.5
    idle_batches: float = 1.0
    latency_alpha: float = 0.2


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a batch goes: ``order`` (replica indexes, the chosen one first) and whether
    the chosen replica held the batch's family."""

    order: tuple[int, ...]
    affinity: bool

    @property
    def replica(self) -> int:
        return self.order[0]


@dataclass
class _Replica:
    spec: ReplicaSpec
    families: OrderedDict[int, int] = field(default_factory=OrderedDict)
    held_tokens: int = 0
    #: batch id -> (estimated seconds, sent at)
    outstanding: dict[str, tuple[float, float]] = field(default_factory=dict)
    ratio: float = 1.0
    sent: int = 0
    hits: int = 0
    misses: int = 0
    _churn: int = 0

    def load(self) -> float:
        return sum(est for est, _ in self.outstanding.values()) * self.ratio / self.spec.weight

    def remember(self, family: int | None, tokens: int, churn: int) -> None:
        """The replica now caches ``family`` (``tokens`` of prefix), newest, and
        ``churn`` tokens of prompts no other batch shares, which push the oldest out as
        they do in the replica's own cache."""
        if family is not None:
            old = self.families.pop(family, None)
            if old is not None:
                self.held_tokens -= old
            tokens = min(tokens, self.spec.cache_tokens)
            self.families[family] = tokens
            self.held_tokens += tokens
        if churn > 0:  # anonymous entries (negative keys), never matched
            self._churn -= 1
            self.families[self._churn] = churn
            self.held_tokens += churn
        while self.held_tokens > self.spec.cache_tokens and len(self.families) > 1:
            _, gone = self.families.popitem(last=False)
            self.held_tokens -= gone


class Router:
    """Routes the batches of one deployment over its replicas (see the module)."""

    def __init__(self, replicas: Sequence[ReplicaSpec], rules: RoutingRules | None = None,
                 policy: str = "cache_aware") -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = [_Replica(spec) for spec in replicas]
        self.rules = rules or RoutingRules()
        self.policy = policy
        self._where: dict[str, int] = {}
        self._turn = 0
        #: Replicas slowed down (``latency_high``, ``throughput_low``: the anomalies' ids),
        #: which get only a probe: a batch when they have none and none was sent to them
        #: for ``probe_s`` seconds.
        self.slowed: dict[int, set[str]] = {}
        self.probe_s = 5.0
        self._last_sent: dict[int, float] = {}

    def choose(self, family: int | None, prefix_tokens: int, estimate_s: float,
               unavailable: Iterable[int] = (), now: float | None = None) -> Choice:
        """The replica for a batch of ``family`` with ``prefix_tokens`` shared and
        ``estimate_s`` of work; ``unavailable`` replicas (cooling down) only if every
        one is; a slowed replica only as a probe (at ``now``)."""
        down = set(unavailable)
        candidates = [i for i in range(len(self.replicas)) if i not in down] or list(
            range(len(self.replicas)))
        slowed = [i for i in candidates if self.slowed.get(i)]
        if slowed and len(slowed) < len(candidates):
            # A slowed replica is not ejected: it gets a probe now and then (one batch at
            # a time), so that its recovery is seen; else it is only tried last. A probe
            # holds a worker slot for as long as the replica is slow: by time, not share.
            resting = [i for i in slowed if not self.replicas[i].outstanding and now is not None
                       and now - self._last_sent.get(i, -math.inf) >= max(
                           self.probe_s, PROBE_GAP * estimate_s * self.replicas[i].ratio)]
            if resting:
                probe = resting[0]
                rest = sorted((i for i in range(len(self.replicas)) if i != probe),
                              key=lambda i: (i in down or i in slowed,
                                             self.replicas[i].load(), i))
                return Choice((probe, *rest), False)
            candidates = [i for i in candidates if i not in slowed]
            down |= set(slowed)
        loads = {i: self.replicas[i].load() for i in candidates}
        least = min(candidates, key=lambda i: (loads[i], -self._free(i), i))
        chosen, affinity = least, False
        if self.policy == "round_robin":
            self._turn += 1
            chosen = candidates[self._turn % len(candidates)]
        elif self.policy == "least_outstanding":
            few = min(len(self.replicas[i].outstanding) for i in candidates)
            ties = [i for i in candidates if len(self.replicas[i].outstanding) == few]
            self._turn += 1
            chosen = ties[self._turn % len(ties)]
        elif family is not None:
            holders = [i for i in candidates if family in self.replicas[i].families]
            if holders:
                best = min(holders, key=lambda i: (loads[i], i))
                rules = self.rules
                slack = max(rules.imbalance_s, rules.imbalance_batches * estimate_s)
                idle = (loads[least] < rules.idle_batches * estimate_s
                        and loads[best] - loads[least] >= estimate_s)
                if loads[best] - loads[least] <= slack and not idle:
                    chosen, affinity = best, True
        rest = sorted((i for i in range(len(self.replicas)) if i != chosen),
                      key=lambda i: (i in down, loads.get(i, 0.0), i))
        return Choice((chosen, *rest), affinity)

    def _free(self, i: int) -> int:
        r = self.replicas[i]
        return r.spec.cache_tokens - r.held_tokens

    def sent(self, batch_id: str, choice: Choice, family: int | None, prefix_tokens: int,
             estimate_s: float, now: float, other_tokens: int = 0) -> None:
        """A batch went to ``choice.replica``: count its work there; it caches the family
        (and ``other_tokens``, the batch's prompts beyond the shared prefix, which only
        take room)."""
        r = self.replicas[choice.replica]
        r.outstanding[batch_id] = (max(estimate_s, 1e-3), now)
        r.sent += 1
        if choice.affinity:
            r.hits += 1
        elif family is not None:
            r.misses += 1
        r.remember(family, prefix_tokens, other_tokens)
        self._where[batch_id] = choice.replica
        self._last_sent[choice.replica] = now

    def done(self, batch_id: str, seconds: float | None = None,
             replica: int | None = None) -> None:
        """A batch finished (on ``replica``, if the worker had to use another one) in
        ``seconds``: its work leaves the replica, and the time teaches its ratio."""
        planned = self._where.pop(batch_id, None)
        if planned is None:
            return
        est, _ = self.replicas[planned].outstanding.pop(batch_id, (0.0, 0.0))
        ran = self.replicas[replica if replica is not None and
                            0 <= replica < len(self.replicas) else planned]
        if seconds is not None and est > 0 and seconds > 0:
            a = self.rules.latency_alpha
            ran.ratio = (1 - a) * ran.ratio + a * min(max(seconds / est, 0.05), 20.0)

    def forget_before(self, cutoff: float) -> int:
        """Drop batches sent before ``cutoff`` that never reported (their worker was lost;
        the reconciler runs their jobs again elsewhere). Returns how many."""
        gone = 0
        for r in self.replicas:
            for batch_id in [b for b, (_, at) in r.outstanding.items() if at < cutoff]:
                del r.outstanding[batch_id]
                self._where.pop(batch_id, None)
                gone += 1
        return gone

    def snapshot(self) -> list[dict[str, Any]]:
        """Per replica, for metrics and ``promptbatch status``."""
        return [{"replica": r.spec.name, "weight": r.spec.weight,
                 "outstanding": len(r.outstanding), "outstanding_s": round(r.load(), 3),
                 "latency_ratio": round(r.ratio, 3), "sent": r.sent,
                 "affinity_hits": r.hits, "affinity_misses": r.misses,
                 "families": sum(1 for k in r.families if k >= 0),
                 "cached_tokens": r.held_tokens, "slowed": bool(self.slowed.get(i))}
                for i, r in enumerate(self.replicas)]


def model_family(model: str, family: int | None) -> int | None:
    """A prefix family as one replica's cache holds it: per model (a prefix computed for
    one model is not cached for another), never negative (the record's anonymous entries
    are)."""
    return None if family is None else hash((model, family)) & FAMILY_MASK


#: Keeps a family key non-negative (``model_family``).
FAMILY_MASK = (1 << 62) - 1


class Routing:
    """The routers of the replica sets (``Settings.replicas``, per provider), as the
    scheduler uses them: a batch's replicas in the order to try, its end, and what
    ``status`` and the metrics show.

    One router per replica set, whatever the model: two models served by the same
    replicas share their load. Prefix families stay per model (``model_family``), and
    so do the names of cool-downs (``keys.replica``, kept by the workers per deployment).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules = RoutingRules(imbalance_batches=settings.routing_imbalance_batches,
                                  idle_batches=settings.routing_idle_batches)
        #: Per provider: its router and replica URLs (None: the provider has one address).
        self.routers: dict[str, tuple[Router, list[str]] | None] = {}
        #: Per provider: the deployments routed over its replicas so far.
        self.deployments: dict[str, set[str]] = {}
        #: Replica names (``keys.replica``) cooling down, as the scheduler last read them.
        self.cooling: set[str] = set()

    def _router(self, provider: str) -> tuple[Router, list[str]] | None:
        if provider not in self.routers:
            replicas = self.settings.replicas(provider)
            self.routers[provider] = None if not replicas else (
                Router([ReplicaSpec(url, weight, cache) for url, weight, cache in replicas],
                       self.rules, self.settings.routing_policy),
                [url for url, _, _ in replicas])
            found = self.routers[provider]
            if found is not None:
                found[0].probe_s = self.settings.anomaly_probe_s
        return self.routers[provider]

    def route(self, batch_id: str, jobs: Sequence[PendingJob], shared_prefix_chars: int,
              estimate_s: float, dep: str, now: float) -> list[int] | None:
        """The replicas of ``dep`` in the order the batch should try them (None: the
        deployment has one address)."""
        provider, _, model = dep.partition("|")
        found = self._router(provider)
        if found is None:
            return None
        router, urls = found
        self.deployments.setdefault(provider, set()).add(dep)
        family = model_family(model, family_of(jobs[0]) if jobs else None)
        prefix = shared_prefix_chars // CHARS_PER_TOKEN
        other = max(0, sum(j.tokens for j in jobs) - len(jobs) * prefix)
        down = [i for i, url in enumerate(urls) if keys.replica(dep, url) in self.cooling]
        choice = router.choose(family, prefix, estimate_s, down, now)
        router.sent(batch_id, choice, family, prefix, estimate_s, now, other)
        return list(choice.order)

    def done(self, batch_id: str, seconds: float | None = None,
             replica: int | None = None) -> None:
        """The batch ended (``seconds``: its provider call's time, when it made one; None
        when it ran nothing or ended early): its work leaves its replica."""
        for found in self.routers.values():  # one per provider: few
            if found is not None:
                found[0].done(batch_id, seconds, replica)

    def slow(self, provider: str, replica: str, why: str, on: bool = True) -> bool:
        """Mark the replica ``replica`` (its address without the scheme) of ``provider``
        slowed for ``why`` (an anomaly's id), or (``on`` false) no longer for it: while
        any reason holds, it gets only a probe batch now and then (``anomaly_probe_s``).
        Whether the provider has that replica."""
        found = self._router(provider)
        if found is None:
            return False
        router, urls = found
        for i, url in enumerate(urls):
            if url.split("://", 1)[-1] == replica:
                reasons = router.slowed.setdefault(i, set())
                if on:
                    reasons.add(why)
                else:
                    reasons.discard(why)
                return True
        return False

    def forget_before(self, cutoff: float) -> None:
        for found in self.routers.values():
            if found is not None:
                found[0].forget_before(cutoff)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every replica of every routed provider (``deployment`` names the replica set),
        with whether it cools down (for any model routed over it)."""
        rows = []
        for provider, found in sorted(self.routers.items()):
            if found is None:
                continue
            router, urls = found
            deps = self.deployments.get(provider, set())
            for url, row in zip(urls, router.snapshot(), strict=True):
                cooling = any(keys.replica(dep, url) in self.cooling for dep in deps)
                rows.append({"deployment": provider, **row, "cooling": cooling})
        return rows

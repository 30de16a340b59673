"""The batching policy: ``plan(pool, now, settings, capacity, service) -> Plan``.

A pure function: no Redis, no Celery, no clock. It reads the pending pool and returns
the batches to send now, the jobs to expire, and the fair-share charges to record.

Rules, in the order they are applied each tick:

1. **Compatibility.** A batch draws from one group: one (provider, model, params) key and
   one class. Its seed's class is its queue.
2. **Expiry.** A job whose deadline comes before ``now + estimated service time of a
   batch of one`` can no longer make it: it is expired, never sent.
3. **Classes in order, no inversion.** Classes are visited critical first. Once a class
   of a key keeps jobs waiting this tick, no lower class of that key is sent this tick,
   not even under deadline pressure (under overload the lower classes absorb the misses).
   Aging (``Pool.promote``, applied by the loop) moves a job up one class per
   ``aging_s`` waited, so no class starves.
4. **Deadline pressure.** A job whose slack (``deadline - now - estimated time of a full
   batch``) is under ``deadline_guard_ms`` seeds a batch now, whatever the capacity, as
   long as some worker is alive (with none, it would only wait in the broker; here it
   can at least be expired on time).
5. **Work-conserving waiting.** Let ``idle = slots - inflight`` (worker processes with
   nothing to run) and ``room = 2 * slots - inflight`` (one more batch may wait in the
   broker per worker process, so a worker that finishes never waits for a tick).

   * While a worker is idle, a group is sent at once, full or not: waiting cannot help
     a worker that has nothing to do.
   * While all workers are busy but there is room, a group is sent only once waiting
     can no longer improve it: it holds a full batch (``max_batch_size`` jobs), or its
     oldest job has waited its class's ``max_wait_ms``.
   * Without room, only deadline pressure sends. Everything else waits here, not in
     the broker, where it can still be regrouped, reordered and cancelled.
6. **Fairness.** Inside a group, seeds go to tenants in weighted-fair order (the tenant
   with the least work served per weight goes next; a tenant that arrives starts at the
   current minimum), and each tenant's own jobs go earliest deadline first. One
   tenant's backlog therefore delays another tenant's job by about one batch.
7. **Similarity.** The seed's nearest neighbours in its group (inner product of unit
   vectors) above ``similarity_threshold`` join it, those sharing the longest prefix
   with the seed first, up to ``max_batch_size`` jobs and ``max_batch_tokens``. When
   more than a full batch remains in the group, the batch is topped up with the next
   nearest jobs below the threshold: a slot is then worth more than purity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from config.settings import Settings
from scheduler.pool import Group, PendingJob, Pool, shared_prefix_chars
from scheduler.service_time import ServiceModel

#: Neighbours fetched per seed, as a multiple of max_batch_size.
SEARCH_FACTOR = 2
#: Seeds searched together in one FAISS call.
SEEDS_PER_SEARCH = 8


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the workers can take: pool processes, and batches sent but not finished."""

    slots: int
    inflight: int = 0

    @property
    def idle(self) -> int:
        """Worker processes with nothing to run."""
        return max(0, self.slots - self.inflight)

    @property
    def room(self) -> int:
        """Batches that may still be sent without piling up in the broker."""
        return max(0, 2 * self.slots - self.inflight)


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """A batch to send now."""

    key: str
    cls: int
    jobs: tuple[PendingJob, ...]
    similarity: float | None
    shared_prefix_chars: int
    reason: str

    @property
    def tokens(self) -> int:
        """Estimated prompt tokens of the batch."""
        return sum(j.tokens for j in self.jobs)


@dataclass
class Plan:
    """What one tick decided."""

    batches: list[PlannedBatch] = field(default_factory=list)
    expired: list[PendingJob] = field(default_factory=list)
    charges: dict[tuple[str, int, str], float] = field(default_factory=dict)


@dataclass
class _Budget:
    idle: int
    room: int
    alive: bool

    def spend(self) -> None:
        self.idle = max(0, self.idle - 1)
        self.room = max(0, self.room - 1)


def plan(pool: Pool, now: float, settings: Settings, capacity: Capacity,
         service: ServiceModel | None = None,
         tenant_weights: dict[str, float] | None = None) -> Plan:
    """Decide the batches to send now. Reads ``pool``; changes nothing."""
    service = service or ServiceModel()
    weights = tenant_weights or {}
    out = Plan()
    taken: set[int] = set()
    remaining: dict[tuple[str, int], int] = {}
    for gk, g in pool.groups.items():
        one = service.estimate(g.key, 1)
        expired = 0
        for deadline, seq in g.by_deadline:
            if deadline - now >= one:
                break
            out.expired.append(g.jobs[seq])
            taken.add(seq)
            expired += 1
        remaining[gk] = len(g.jobs) - expired
    budget = _Budget(capacity.idle, capacity.room, capacity.slots > 0)
    held: set[str] = set()
    for cls in pool.classes():
        groups = [g for (_, c), g in pool.groups.items() if c == cls]
        groups.sort(key=lambda g: _head_urgency(g, taken))
        for g in groups:
            left = _plan_group(g, remaining[(g.key, g.cls)], now, settings, service, budget,
                               g.key in held, taken, out, pool.served, weights)
            if left > 0:
                held.add(g.key)
    return out


def _head_urgency(g: Group, taken: set[int]) -> float:
    best = float("inf")
    for jobs in g.by_tenant.values():
        for urgency, seq in jobs:
            if seq not in taken:
                best = min(best, urgency)
                break
    return best


def _plan_group(g: Group, remaining: int, now: float, settings: Settings,
                service: ServiceModel, budget: _Budget, blocked: bool, taken: set[int],
                out: Plan, served: dict[tuple[str, int, str], float],
                weights: dict[str, float]) -> int:
    """Plan one group's batches; return how many of its jobs stay pending."""
    guard = settings.deadline_guard_ms / 1000.0
    full_time = service.estimate(g.key, settings.max_batch_size)
    fair = _FairShare(g, served, weights, taken)
    while remaining > 0:
        if blocked:
            break
        forced = _forced_seeds(g, now, full_time, guard, taken) if budget.alive else []
        if forced:
            seeds, reason = forced, "deadline"
        else:
            count, reason = _allowance(g, now, settings, budget, remaining, taken)
            if count == 0:
                break
            seeds = fair.pick(count)
        formed = _form(g, seeds, settings, taken, remaining, reason)
        if not formed:
            break
        for batch in formed:
            out.batches.append(batch)
            budget.spend()
            remaining -= len(batch.jobs)
            fair.charge(batch)
    out.charges.update(fair.charges())
    return remaining


def _allowance(g: Group, now: float, settings: Settings, budget: _Budget, remaining: int,
               taken: set[int]) -> tuple[int, str]:
    """How many batches the group may send now, and why."""
    size = settings.max_batch_size
    full_batches = remaining // size
    if budget.idle > 0:
        return min(budget.idle, max(1, -(-remaining // size))), "idle"
    if budget.room == 0:
        return 0, ""
    if full_batches > 0:
        return min(budget.room, full_batches), "full"
    oldest = next((j.created_at for seq, j in g.jobs.items() if seq not in taken), now)
    if now - oldest >= settings.max_wait_s(g.cls):
        return 1, "wait"
    return 0, ""


def _forced_seeds(g: Group, now: float, full_time: float, guard: float,
                  taken: set[int]) -> list[PendingJob]:
    """Jobs whose slack is under the guard, earliest deadline first."""
    seeds: list[PendingJob] = []
    for deadline, seq in g.by_deadline:
        if deadline - now - full_time >= guard:
            break
        if seq not in taken:
            seeds.append(g.jobs[seq])
    return seeds


class _FairShare:
    """Weighted fair choice of seeds among a group's tenants (virtual time)."""

    def __init__(self, g: Group, served: dict[tuple[str, int, str], float],
                 weights: dict[str, float], taken: set[int]) -> None:
        self.g = g
        self.taken = taken
        self.weights = weights
        self.recorded = {t: served.get((g.key, g.cls, t)) for t in g.by_tenant}
        known = [v for v in self.recorded.values() if v is not None]
        floor = min(known) if known else 0.0
        self.vtime = {t: (v if v is not None else floor) for t, v in self.recorded.items()}

    def pick(self, count: int) -> list[PendingJob]:
        """Up to ``count`` distinct seeds, each from the tenant served least so far."""
        seeds: list[PendingJob] = []
        vtime = dict(self.vtime)
        cursors = {t: iter(jobs) for t, jobs in self.g.by_tenant.items()}
        while len(seeds) < count and cursors:
            tenant = min(cursors, key=lambda t: (vtime[t], t))
            job = next((self.g.jobs[seq] for _, seq in cursors[tenant]
                        if seq not in self.taken), None)
            if job is None:
                del cursors[tenant]
                continue
            seeds.append(job)
            vtime[tenant] += 1.0 / self.weights.get(tenant, 1.0)
        return seeds

    def charge(self, batch: PlannedBatch) -> None:
        """Count a formed batch's jobs against their tenants."""
        for job in batch.jobs:
            if job.tenant in self.vtime:
                self.vtime[job.tenant] += 1.0 / self.weights.get(job.tenant, 1.0)

    def charges(self) -> dict[tuple[str, int, str], float]:
        """What to add to the pool's counters (a new tenant is recorded at its start)."""
        out: dict[tuple[str, int, str], float] = {}
        for tenant, vt in self.vtime.items():
            before = self.recorded[tenant]
            if before is None or vt != before:
                out[(self.g.key, self.g.cls, tenant)] = vt - (before or 0.0)
        return out


def _form(g: Group, seeds: list[PendingJob], settings: Settings, taken: set[int],
          remaining: int, reason: str) -> list[PlannedBatch]:
    """Grow each seed into a batch with its nearest free neighbours.

    Seeds are searched a few at a time, so that later seeds see what earlier ones took.
    """
    batches: list[PlannedBatch] = []
    for start in range(0, len(seeds), SEEDS_PER_SEARCH):
        chunk = [s for s in seeds[start:start + SEEDS_PER_SEARCH] if s.seq not in taken]
        if chunk:
            formed = _form_chunk(g, chunk, settings, taken, remaining, reason)
            remaining -= sum(len(b.jobs) for b in formed)
            batches += formed
    return batches


def _form_chunk(g: Group, seeds: list[PendingJob], settings: Settings, taken: set[int],
                remaining: int, reason: str) -> list[PlannedBatch]:
    size, max_tokens = settings.max_batch_size, settings.max_batch_tokens
    threshold = settings.similarity_threshold
    # Later seeds of one search may find their nearest taken by earlier ones: look further.
    k = min(len(g.jobs), size * SEARCH_FACTOR + len(seeds) * (size // 2 + 1))
    sims, ids = g.search(g.vectors([s.seq for s in seeds]), k)
    batches: list[PlannedBatch] = []
    for row, seed in enumerate(seeds):
        if seed.seq in taken:
            continue
        taken.add(seed.seq)
        members, tokens, seed_sims = [seed], seed.tokens, []
        # Results come most similar first: the near ones, then the far ones.
        near: list[tuple[int, float, PendingJob]] = []
        far: list[tuple[float, PendingJob]] = []
        for sim, seq in zip(sims[row].tolist(), ids[row].tolist(), strict=True):
            if seq < 0 or seq in taken:
                continue
            job = g.jobs[seq]
            if sim >= threshold:
                near.append((shared_prefix_chars(seed.prefix, job.prefix), sim, job))
            elif len(far) < size:
                far.append((sim, job))
            else:
                break
        near.sort(key=lambda t: (-t[0], -t[1]))
        candidates = [(sim, job) for _, sim, job in near]
        if remaining - len(near) - 1 >= size:
            candidates += far
        for sim, job in candidates:
            if len(members) >= size:
                break
            if tokens + job.tokens > max_tokens:
                continue
            members.append(job)
            seed_sims.append(sim)
            tokens += job.tokens
            taken.add(job.seq)
        remaining -= len(members)
        prefix = (sum(shared_prefix_chars(seed.prefix, j.prefix) for j in members[1:])
                  // max(1, len(members) - 1))
        batches.append(PlannedBatch(
            key=g.key, cls=g.cls, jobs=tuple(members),
            similarity=float(np.mean(seed_sims)) if seed_sims else None,
            shared_prefix_chars=prefix, reason=reason))
    return batches

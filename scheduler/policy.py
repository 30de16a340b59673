"""The batching policy: ``plan(pool, now, settings, capacity, service) -> Plan``.

A pure function: no Redis, no Celery, no clock. It reads the pending pool and returns
the batches to send now, the jobs to expire, and the fair-share charges to record.

Rules, in the order they are applied each tick:

1. **Compatibility.** A batch draws from one group: one (provider, model, params) key and
   one class. Its seed's class is its queue.
2. **Expiry.** A job whose deadline comes before ``now + estimated service time of a
   batch of one`` can no longer make it: it is expired, never sent. A job joins a batch
   only if its deadline leaves room for the estimated time of the batch with it (and
   so does every deadline already in the batch); the batch carries that estimate, and
   the worker expires a job whose deadline no longer leaves it when the batch starts
   (it waited in the broker). Before anything is learned the estimate is the provider's
   prior, conservative for remote providers.
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
   nothing to run) and, for class ``c``, ``room(c) = 2 * slots - running - queued in
   classes c and above`` (one more batch may wait in the broker per worker process, so a
   worker that finishes never waits for a tick; batches of lower classes waiting in the
   broker do not count, since workers take the queues in priority order).
   Normal, low and bulk batches leave ``reserved_slots`` worker processes (default: a
   quarter of them) to critical and high: a worker can never preempt a running batch, so
   without a reserve an interactive job could wait a full batch time for a worker.

   * While a worker is idle, a group is sent at once, full or not: waiting cannot help
     a worker that has nothing to do. The work is spread over the idle workers, but no
     batch is made smaller than the break-even size ``fixed / per_job`` of the learned
     service-time line (the size at which the fixed cost of a call is paid back), so
     spreading never costs more capacity than it saves latency.
   * While all workers are busy but there is room, a group is sent only once waiting
     can no longer improve it: it holds a full batch (``max_batch_size`` jobs), or its
     oldest job has waited its class's ``max_wait_ms``.
   * Without room, only deadline pressure sends. Everything else waits here, not in
     the broker, where it can still be regrouped, reordered and cancelled.
6. **Fairness.** Inside a group, seeds go to tenants in weighted-fair order (the tenant
   with the least work served per weight goes next; a tenant that arrives starts at the
   current minimum), and each tenant's own jobs go earliest deadline first, jobs without
   a deadline after every job with one. One tenant's backlog therefore delays another
   tenant's job by about one batch.
7. **Prefix families, then similarity.** Jobs of a group whose first 256 characters are
   the same (in practice one system prompt or template) form a prefix family, and a
   server that reuses a batch's shared prefix computes it once per batch: so a family
   goes into as few batches as it can. The seed's family joins it first, whole when it
   fits in a batch (even past the spreading target of rule 5), else a batch's worth of
   it, those sharing the longest prefix with the seed first. The rest of the batch is
   filled from the seed's nearest neighbours (inner product of unit vectors) above
   ``similarity_threshold``, taking each neighbour's family whole if it fits, or, for a
   family larger than a batch, its leftover (its size modulo a batch, which leaves it
   exactly whole batches); a family that does not fit is passed over. When a batch slot
   is scarce (the workers are busy and the batch leaves because it is full, waited long
   enough or is under deadline pressure, or more than a full batch would remain) the
   batch is also topped up with the next nearest jobs below the threshold, then with
   whole families from anywhere in the group (largest that fits first), and, should it
   still be less than half full, by cutting the largest families. With idle workers and
   little work, dissimilar jobs rather go out in parallel. A lone job (no family) of a
   tenant with no deadline lets a family's job of the same tenant that arrived at most a
   second later seed before it, so that it joins a batch as a filler rather than seed a
   batch that would cut a family or stay half empty.
8. **Riders.** When capacity is scarce (the batch takes the last idle worker, or none is
   idle) and a batch ends up smaller than the break-even size because its class has no
   more jobs of its key, it is topped up to that size with the nearest jobs of the lower
   classes of the same key. They ride along at little cost to the seed (at most the
   call's fixed cost again), and need no call of their own: whole families or leftovers
   first, then the largest families' jobs. Deadline-pressed batches take no riders. A
   rider is never sent ahead of a waiting job of a higher class, so this is no inversion.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from config.settings import PRIORITY_NAMES, Settings
from scheduler.pool import (
    FAMILY_LEVEL,
    Group,
    PendingJob,
    Pool,
    family_of,
    shared_prefix_chars,
)
from scheduler.service_time import ServiceModel

#: Neighbours fetched per seed, as a multiple of max_batch_size.
SEARCH_FACTOR = 2
#: Family members looked at per seed (as a multiple of max_batch_size) to pick the batch's
#: share of a large family: those sharing the longest prefix with the seed.
KIN_LOOKAHEAD = 2
#: Families of a group looked at to fill a batch with whole families (best fit).
FAMILIES_SCANNED = 256
#: A batch that whole families fill to less than this share of a batch is filled up by
#: cutting the largest families, when a batch slot is scarce.
CUT_BELOW = 0.5
#: A lone job (no prefix family) yields its turn as a seed to a family's job of its
#: tenant that arrived at most this much later, among its next few jobs.
SEED_LOOKAHEAD_S = 1.0
SEED_LOOKAHEAD_JOBS = 64
#: Seeds searched together in one FAISS call.
SEEDS_PER_SEARCH = 8
#: Classes from this one down (normal, low, bulk) leave the reserved worker processes to
#: the classes above them.
SHARED_FROM = 2


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the workers can take.

    ``slots``: worker pool processes; ``inflight``: batches sent and not finished (running
    or waiting in the broker); ``queued``: of those, the ones still waiting in each class's
    broker queue (critical first); ``shared``: of ``inflight``, the batches of the classes
    from ``SHARED_FROM`` down (unknown, -1: all of them); ``reserved``: worker processes
    those classes leave to the classes above them.
    """

    slots: int
    inflight: int = 0
    queued: tuple[int, ...] = ()
    shared: int = -1
    reserved: int = 0

    def idle(self, cls: int = 0) -> int:
        """Worker processes with nothing to run that class ``cls`` may use."""
        free = max(0, self.slots - self.inflight)
        if cls >= SHARED_FROM and self.reserved:
            free = min(free, max(0, self.slots - self.reserved - self._shared()))
        return free

    def room(self, cls: int) -> int:
        """Batches of class ``cls`` that may still be sent without piling up in the broker.

        Workers take the class queues in priority order, so batches of lower classes
        waiting in the broker do not stand in the way of ``cls``.
        """
        queued = sum(self.queued)
        running = max(0, self.inflight - queued)
        room = max(0, 2 * self.slots - running - sum(self.queued[:cls + 1]))
        if cls >= SHARED_FROM and self.reserved:
            room = min(room, max(0, 2 * (self.slots - self.reserved) - self._shared()))
        return room

    def _shared(self) -> int:
        return self.inflight if self.shared < 0 else self.shared


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """A batch to send now."""

    key: str
    cls: int
    jobs: tuple[PendingJob, ...]
    similarity: float | None
    shared_prefix_chars: int
    reason: str
    #: Characters of the seed's prefix (1,024 or more) that jobs left pending share: the
    #: provider marks it for its prompt cache, so those jobs can read what this writes.
    pending_prefix_chars: int = 0
    #: Estimated seconds the batch takes once started (the worker expires a job whose
    #: deadline no longer leaves this much when the batch starts).
    estimate_s: float = 0.0

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
    """The capacity left while a tick plans."""

    slots: int
    inflight: int
    queued: list[int]
    shared: int
    reserved: int

    @property
    def alive(self) -> bool:
        return self.slots > 0

    def _now(self) -> Capacity:
        return Capacity(self.slots, self.inflight, tuple(self.queued), self.shared,
                        self.reserved)

    def idle(self, cls: int) -> int:
        return self._now().idle(cls)

    def room(self, cls: int) -> int:
        return self._now().room(cls)

    def spend(self, cls: int) -> None:
        """A batch of ``cls`` was planned: it runs at once or waits in the broker."""
        if self.idle(0) == 0:
            self.queued[cls] += 1
        self.inflight += 1
        if cls >= SHARED_FROM:
            self.shared += 1


def plan(pool: Pool, now: float, settings: Settings, capacity: Capacity,
         service: ServiceModel | None = None,
         tenant_weights: dict[str, float] | None = None) -> Plan:
    """Decide the batches to send now. Reads ``pool``; changes nothing."""
    return _Tick(pool, now, settings, capacity, service or ServiceModel(),
                 tenant_weights or {}).run()


class _Tick:
    """The working state of one call to ``plan``."""

    def __init__(self, pool: Pool, now: float, settings: Settings, capacity: Capacity,
                 service: ServiceModel, weights: dict[str, float]) -> None:
        self.pool = pool
        self.now = now
        self.settings = settings
        self.service = service
        self.weights = weights
        self.out = Plan()
        self.taken = _Taken()
        self.remaining: dict[tuple[str, int], int] = {}
        queued = list(capacity.queued) + [0] * (len(PRIORITY_NAMES) - len(capacity.queued))
        reserved = (settings.reserved_slots if settings.reserved_slots is not None
                    else capacity.slots // 4)
        shared = capacity.inflight if capacity.shared < 0 else capacity.shared
        self.budget = _Budget(capacity.slots, capacity.inflight, queued, shared,
                              min(reserved, max(0, capacity.slots - 1)))

    def run(self) -> Plan:
        self._expire()
        held: set[str] = set()
        for cls in self.pool.classes():
            groups = [g for (_, c), g in self.pool.groups.items() if c == cls]
            groups.sort(key=self._head_urgency)
            for g in groups:
                if g.key in held:
                    continue  # a higher class of this key keeps jobs waiting: no inversion
                if self._plan_group(g) > 0:
                    held.add(g.key)
        return self.out

    def _expire(self) -> None:
        for gk, g in self.pool.groups.items():
            one = self.service.estimate(g.key, 1)
            expired = 0
            for deadline, seq in g.by_deadline:
                if deadline - self.now >= one:
                    break
                self.out.expired.append(g.jobs[seq])
                self.taken.add(g.jobs[seq])
                expired += 1
            self.remaining[gk] = len(g.jobs) - expired

    def _head_urgency(self, g: Group) -> tuple[int, float]:
        best = (2, float("inf"))
        for jobs in g.by_tenant.values():
            for kind, due, seq in jobs:
                if seq not in self.taken:
                    best = min(best, (kind, due))
                    break
        return best

    def _plan_group(self, g: Group) -> int:
        """Plan one group's batches; return how many of its jobs stay pending."""
        gk = (g.key, g.cls)
        guard = self.settings.deadline_guard_ms / 1000.0
        full_time = self.service.estimate(g.key, self.settings.max_batch_size)
        fair = _FairShare(g, self.pool.served, self.weights, self.taken,
                          self.settings.max_batch_size)
        while self.remaining[gk] > 0:
            forced = self._forced_seeds(g, full_time, guard) if self.budget.alive else []
            if forced:
                seeds, reason, limit = forced, "deadline", self.settings.max_batch_size
            else:
                count, reason, limit = self._allowance(g)
                if count == 0:
                    break
                seeds = fair.pick(count)
            formed = self._form(g, seeds, reason, limit)
            if not formed:
                break
            for batch in formed:
                self.out.batches.append(batch)
                self.budget.spend(g.cls)
                fair.charge(batch)
        self.out.charges.update(fair.charges())
        return self.remaining[gk]

    def _allowance(self, g: Group) -> tuple[int, str, int]:
        """How many batches the group may send now, why, and their size limit."""
        size = self.settings.max_batch_size
        remaining = self.remaining[(g.key, g.cls)]
        idle = self.budget.idle(g.cls)
        if idle > 0:
            # Spread the work over the idle workers, but no batch smaller than the
            # break-even size of the deployment.
            target = min(size, max(self._break_even(g.key), math.ceil(remaining / idle)))
            return min(idle, math.ceil(remaining / target)), "idle", target
        room = self.budget.room(g.cls)
        if room == 0:
            return 0, "", size
        if remaining >= size:
            return min(room, remaining // size), "full", size
        oldest = next((j.created_at for seq, j in g.jobs.items() if seq not in self.taken),
                      self.now)
        if self.now - oldest >= self.settings.max_wait_s(g.cls):
            return 1, "wait", size
        return 0, "", size

    def _break_even(self, key: str) -> int:
        """The batch size at which a call's fixed cost is paid back (learned line)."""
        line = self.service.line(key)
        if line.per_job <= 0:
            return self.settings.max_batch_size
        return min(self.settings.max_batch_size, max(1, math.ceil(line.fixed / line.per_job)))

    def _forced_seeds(self, g: Group, full_time: float, guard: float) -> list[PendingJob]:
        """Jobs whose slack is under the guard, earliest deadline first."""
        seeds: list[PendingJob] = []
        for deadline, seq in g.by_deadline:
            if deadline - self.now - full_time >= guard:
                break
            if seq not in self.taken:
                seeds.append(g.jobs[seq])
        return seeds

    def _form(self, g: Group, seeds: list[PendingJob], reason: str,
              limit: int) -> list[PlannedBatch]:
        """Grow each seed into a batch with its nearest free neighbours.

        Seeds are searched a few at a time, so that later seeds see what earlier ones took.
        """
        batches: list[PlannedBatch] = []
        for start in range(0, len(seeds), SEEDS_PER_SEARCH):
            chunk = [s for s in seeds[start:start + SEEDS_PER_SEARCH] if s.seq not in self.taken]
            if chunk:
                batches += self._form_chunk(g, chunk, reason, limit)
        return batches

    def _form_chunk(self, g: Group, seeds: list[PendingJob], reason: str,
                    size: int) -> list[PlannedBatch]:
        gk = (g.key, g.cls)
        # Later seeds of one search may find their nearest taken by earlier ones: look further.
        k = min(len(g.jobs), size * SEARCH_FACTOR + len(seeds) * (size // 2 + 1))
        vectors = g.vectors([s.seq for s in seeds])
        sims, ids = g.search(vectors, k)
        batches: list[PlannedBatch] = []
        # The other seeds of this search stay free for their own batches.
        self.taken.reserved = {s.seq for s in seeds}
        for row, seed in enumerate(seeds):
            self.taken.reserved.discard(seed.seq)
            if seed.seq in self.taken:
                continue
            self.taken.add(seed)
            # The seed's prefix family first, whole when it fits in a batch (even past a
            # spreading target: splitting it would cost its prefix again).
            kin = self._kin(g, seed, vectors[row])
            cap = max(size, min(self.settings.max_batch_size, 1 + len(kin)))
            members = _Members(seed, cap, self.settings.max_batch_tokens, self.now,
                               functools.partial(self.service.estimate, g.key))
            members.extend(kin, self.taken)
            near, far = self._candidates(g, seed, sims[row], ids[row], size)
            fill = reason != "idle" or self.remaining[gk] - len(near) - 1 >= size
            pool = near + (far if fill else [])
            room = size - len(members.jobs)
            if room > 0:
                members.extend(self._whole(g, pool, room, family_of(seed), vectors[row]),
                               self.taken, limit=size)
            if fill and len(members.jobs) < size:
                members.extend(self._best_fit(g, size - len(members.jobs), vectors[row]),
                               self.taken, limit=size)
            if fill and len(members.jobs) < size * CUT_BELOW:
                # Whole families leave a scarce slot under half used: cut the largest.
                members.extend(self._largest_first(g, pool), self.taken, limit=size)
            self.remaining[gk] -= len(members.jobs)
            if reason != "deadline" and self.budget.idle(g.cls) <= 1:
                self._add_riders(g, members, vectors[row:row + 1])
            batches.append(members.batch(g.key, g.cls, reason,
                                         self.pool.pending_prefix_chars(members.jobs),
                                         self.service.estimate(g.key, len(members.jobs))))
        return batches

    def _free_kin(self, g: Group, family: int | None, exclude: int, limit: int,
                  ) -> list[PendingJob]:
        """Up to ``limit`` free jobs of a prefix family (arrival order), ``exclude`` aside."""
        members = g.families.get(family) if family is not None else None
        if not members or len(members) < 2:
            return []
        free = (g.jobs[seq] for seq in members if seq != exclude and seq not in self.taken)
        return list(itertools.islice(free, limit))

    def _kin(self, g: Group, seed: PendingJob, seed_vector: np.ndarray,
             ) -> list[tuple[float, PendingJob]]:
        """The seed's free family members for its batch, those sharing the longest prefix
        with it first (a family larger than a batch is cut along its sub-families)."""
        size = self.settings.max_batch_size
        kin = self._free_kin(g, family_of(seed), seed.seq, KIN_LOOKAHEAD * size)
        if len(kin) >= size:  # more than the batch takes: the closest relatives first
            mine = seed.prefix[FAMILY_LEVEL + 1:]  # the family's levels are equal

            def deeper(j: PendingJob) -> int:
                n = 0
                for x, y in zip(mine, j.prefix[FAMILY_LEVEL + 1:], strict=False):
                    if x != y:
                        break
                    n += 1
                return -n

            kin.sort(key=deeper)
        return self._scored(g, kin[:size - 1], seed_vector)

    def _whole(self, g: Group, candidates: list[tuple[float, PendingJob]], room: int,
               skip: int | None, seed_vector: np.ndarray) -> list[tuple[float, PendingJob]]:
        """Fill ``room`` from the candidates (nearest first), taking prefix families whole:
        a candidate brings its whole family when it fits. A family larger than a batch is
        split anyway: it gives its leftover (its size modulo a batch), which leaves it
        exactly whole batches. Any other family that does not fit is passed over."""
        size = self.settings.max_batch_size
        out: list[tuple[float, PendingJob]] = []
        chosen: set[int] = set()
        seen: set[int | None] = {skip}
        for sim, job in candidates:
            if room <= 0:
                break
            if job.seq in self.taken or job.seq in chosen:
                continue
            family = family_of(job)
            if family is None:
                out.append((sim, job))
                chosen.add(job.seq)
                room -= 1
                continue
            if family in seen:
                continue
            seen.add(family)
            kin = self._free_kin(g, family, job.seq, size + 1)
            if len(kin) + 1 <= room:
                take = len(kin) + 1
            elif len(kin) + 1 > size:  # larger than a batch: its leftover, if it fits
                total = len(kin) + 1 if len(kin) < size else self._family_free(g, family)
                take = total % size
                if take == 0 or take > room:
                    continue
            else:
                continue  # a family that does not fit whole waits for a batch of its own
            out.append((sim, job))
            out += self._scored(g, kin[:take - 1], seed_vector)
            chosen.update([job.seq, *(k.seq for k in kin[:take - 1])])
            room -= take
        return out

    def _best_fit(self, g: Group, room: int, seed_vector: np.ndarray,
                  ) -> list[tuple[float, PendingJob]]:
        """Whole families (or leftovers of families larger than a batch) from anywhere in
        the group, the largest that fits first, until nothing more fits."""
        size = self.settings.max_batch_size
        free: list[tuple[int, int]] = []  # (jobs to take, family)
        for family in itertools.islice(g.families, FAMILIES_SCANNED):
            n = self._family_free(g, family)
            take = n if n <= size else n % size
            if take > 1:
                free.append((take, family))
        free.sort(key=lambda t: -t[0])  # stable: the group's oldest families first
        out: list[PendingJob] = []
        for take, family in free:
            if take <= room:
                out += self._free_kin(g, family, -1, take)
                room -= take
        return self._scored(g, out, seed_vector)

    def _largest_first(self, g: Group, candidates: list[tuple[float, PendingJob]],
                       ) -> list[tuple[float, PendingJob]]:
        """Free candidates, those of the largest families first (a cut costs a large
        family the least), nearest first among equals; jobs of no family count as
        families of one."""
        sizes: dict[int | None, int] = {None: 1}
        free = [(sim, job) for sim, job in candidates if job.seq not in self.taken]
        for _, job in free:
            family = family_of(job)
            if family not in sizes:
                sizes[family] = self._family_free(g, family)  # type: ignore[arg-type]
        return sorted(free, key=lambda c: -sizes[family_of(c[1])])

    def _family_free(self, g: Group, family: int) -> int:
        """How many jobs of a family are still free this tick."""
        return len(g.families.get(family, ())) - self.taken.families[(g.key, g.cls, family)]

    @staticmethod
    def _scored(g: Group, jobs: list[PendingJob], seed_vector: np.ndarray,
                ) -> list[tuple[float, PendingJob]]:
        """Jobs with their similarity to the seed."""
        if not jobs:
            return []
        sims = g.vectors([j.seq for j in jobs]) @ seed_vector
        return list(zip(sims.tolist(), jobs, strict=True))

    def _candidates(self, g: Group, seed: PendingJob, sims: np.ndarray, ids: np.ndarray,
                    size: int) -> tuple[list[tuple[float, PendingJob]],
                                        list[tuple[float, PendingJob]]]:
        """Free neighbours of the seed: the ``2 * size`` nearest above the threshold,
        longest shared prefix first, and up to ``size`` below it, nearest first."""
        threshold = self.settings.similarity_threshold
        near: list[tuple[int, float, PendingJob]] = []
        far: list[tuple[float, PendingJob]] = []
        # Results come most similar first: the near ones, then the far ones.
        for sim, seq in zip(sims.tolist(), ids.tolist(), strict=True):
            if seq < 0 or seq in self.taken:
                continue
            job = g.jobs[seq]
            if sim >= threshold:
                if len(near) < SEARCH_FACTOR * size:
                    near.append((shared_prefix_chars(seed.prefix, job.prefix), sim, job))
            elif len(far) < size:
                far.append((sim, job))
            else:
                break
        near.sort(key=lambda t: (-t[0], -t[1]))
        return [(sim, job) for _, sim, job in near], far

    def _add_riders(self, g: Group, members: _Members, seed_vector: np.ndarray) -> None:
        """Top a small batch up to the break-even size with lower classes' nearest jobs.

        Only when capacity is scarce (this batch takes the last idle worker, or none is
        idle): the higher class has no more jobs waiting, the call's fixed cost is paid
        anyway, and the lower classes' work would otherwise need a call of its own.
        """
        want = self._break_even(g.key)
        for cls in range(g.cls + 1, len(PRIORITY_NAMES)):
            if len(members.jobs) >= want:
                return
            donor = self.pool.groups.get((g.key, cls))
            if donor is None or self.remaining.get((g.key, cls), 0) == 0:
                continue
            sims, ids = donor.search(seed_vector, want * SEARCH_FACTOR)
            near, far = self._candidates(donor, members.jobs[0], sims[0], ids[0], want)
            before = len(members.jobs)
            # Whole families (or leftovers) first; then, the call being paid for anyway,
            # the largest families' jobs.
            members.extend(self._whole(donor, near + far, want - before, None, seed_vector[0]),
                           self.taken, limit=want)
            members.extend(self._largest_first(donor, near + far), self.taken, limit=want)
            self.remaining[(g.key, cls)] -= len(members.jobs) - before


class _Taken:
    """Jobs taken this tick (into a batch, or expired), with a count per prefix family."""

    def __init__(self) -> None:
        self.seqs: set[int] = set()
        self.families: Counter[tuple[str, int, int]] = Counter()
        #: Seeds of the batches being formed: no other batch takes them.
        self.reserved: set[int] = set()

    def __contains__(self, seq: object) -> bool:
        return seq in self.seqs or seq in self.reserved

    def add(self, job: PendingJob) -> None:
        if job.seq in self.seqs:
            return
        self.seqs.add(job.seq)
        family = family_of(job)
        if family is not None:
            self.families[(job.key, job.cls, family)] += 1


class _Members:
    """A batch being formed: the seed first, within the size and token limits, and only
    jobs whose deadlines (and the batch's) leave room for the batch's estimated time."""

    def __init__(self, seed: PendingJob, size: int, max_tokens: int, now: float,
                 estimate: Callable[[int], float]) -> None:
        self.jobs = [seed]
        self.sims: list[float] = []
        self.tokens = seed.tokens
        self.size = size
        self.max_tokens = max_tokens
        self.now = now
        self.estimate = estimate
        self.due = seed.deadline if seed.deadline is not None else math.inf

    def extend(self, candidates: list[tuple[float, PendingJob]], taken: _Taken,
               limit: int | None = None) -> None:
        cap = self.size if limit is None else min(limit, self.size)
        for sim, job in candidates:
            if len(self.jobs) >= cap:
                break
            if job.seq in taken or self.tokens + job.tokens > self.max_tokens:
                continue
            due = min(self.due, job.deadline if job.deadline is not None else math.inf)
            if due < math.inf and due - self.now < self.estimate(len(self.jobs) + 1):
                continue  # with it, the batch would finish after a deadline
            self.jobs.append(job)
            self.sims.append(sim)
            self.tokens += job.tokens
            self.due = due
            taken.add(job)

    def batch(self, key: str, cls: int, reason: str, pending_prefix: int,
              estimate_s: float) -> PlannedBatch:
        seed = self.jobs[0]
        prefix = (sum(shared_prefix_chars(seed.prefix, j.prefix) for j in self.jobs[1:])
                  // max(1, len(self.jobs) - 1))
        return PlannedBatch(key=key, cls=cls, jobs=tuple(self.jobs),
                            similarity=float(np.mean(self.sims)) if self.sims else None,
                            shared_prefix_chars=prefix, reason=reason,
                            pending_prefix_chars=pending_prefix, estimate_s=estimate_s)


class _FairShare:
    """Weighted fair choice of seeds among a group's tenants (virtual time)."""

    def __init__(self, g: Group, served: dict[tuple[str, int, str], float],
                 weights: dict[str, float], taken: _Taken, size: int) -> None:
        self.g = g
        self.taken = taken
        self.size = size
        #: Seeds chosen per family in the current pick: a family they take whole needs no
        #: seed of its own.
        self.seeded: Counter[int] = Counter()
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
        self.seeded.clear()
        while len(seeds) < count and cursors:
            tenant = min(cursors, key=lambda t: (vtime[t], t))
            job = self._next(cursors[tenant], seeds)
            if job is None:
                del cursors[tenant]
                continue
            seeds.append(job)
            family = family_of(job)
            if family is not None:
                self.seeded[family] += 1
            vtime[tenant] += 1.0 / self.weights.get(tenant, 1.0)
        return seeds

    def _next(self, cursor: Iterator[tuple[int, float, int]], chosen: list[PendingJob],
              ) -> PendingJob | None:
        """The tenant's next seed: its most urgent free job; but when that job has no
        prefix family and has no deadline, a job of a family among the next few without a
        deadline either (of about the same age) seeds instead, so that the batch is built
        around the family and the lone job joins one as a filler rather than leaving a
        family cut or a batch half empty. A lone job that waited longer seeds anyway."""
        first: PendingJob | None = None
        for kind, due, seq in cursor:
            if seq in self.taken or any(s.seq == seq for s in chosen):
                continue
            job = self.g.jobs[seq]
            family = family_of(job)
            if family is not None and self.seeded[family] * self.size >= len(
                    self.g.families[family]):
                continue  # the batches of seeds chosen already take its family whole
            if first is None:
                first = job
                if kind == 0 or self._has_family(job):
                    return job
                continue
            if kind == 0 or due - first.created_at - self.g.horizon > SEED_LOOKAHEAD_S:
                break
            if self._has_family(job):
                return job
            if seq - first.seq > SEED_LOOKAHEAD_JOBS:
                break
        return first

    def _has_family(self, job: PendingJob) -> bool:
        family = family_of(job)
        return family is not None and len(self.g.families.get(family, ())) > 1

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

"""The pending pool: jobs waiting in the scheduler, grouped and indexed for the policy.

Jobs are grouped by (compatibility key, class). Each group keeps:

* a FAISS index of the jobs' unit vectors (inner product = cosine), behind an ID map so
  that removing sent, cancelled and expired jobs is cheap;
* per tenant, the jobs in urgency order: earliest deadline first, then the jobs without a
  deadline (after every job with one), by arrival;
* the jobs with a deadline in deadline order (for expiry and deadline pressure).

The policy (``scheduler.policy.plan``) only reads the pool; the service loop applies the
outcome (``remove``, ``promote``).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
from sortedcontainers import SortedList

from jobs.chat import CHARS_PER_TOKEN, extra_tokens
from jobs.models import JobSpec
from scheduler.embedders import Vectors

#: Prompt lengths, in characters, at which prefix hashes are taken.
PREFIX_LEVELS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

#: Prefix levels from this index on (1,024 characters and longer) are counted per
#: compatibility key, so a batch can tell whether jobs still pending share its prefix.
COUNTED_FROM = 5

#: A prefix family: the jobs of a group whose first ``PREFIX_LEVELS[FAMILY_LEVEL]``
#: characters (256) are the same, in practice one system prompt or template. The policy
#: packs a family into as few batches as it can, so a server that reuses a batch's shared
#: prefix computes it once per batch.
FAMILY_LEVEL = 3


def family_of(job: PendingJob) -> int | None:
    """The job's prefix family (a hash), or None for a prompt too short to have one."""
    return job.prefix[FAMILY_LEVEL] if len(job.prefix) > FAMILY_LEVEL else None


#: Above this many jobs a group's index becomes an inverted file (approximate search).
APPROX_THRESHOLD = 8_192
#: A group's index is built again from its pending jobs once this many times its size
#: (or APPROX_THRESHOLD, whichever is more) were added since it was built. A group that
#: never empties (a bulk stream) otherwise keeps an inverted file trained on its first
#: jobs: as the prompts drift, the lists fill unevenly (searches slow down) and each
#: list keeps the capacity of its largest size (FAISS does not give memory back on
#: removal): a soak's scheduler grew by ~40 MB and lost a third of its rate per 100,000
#: jobs. A rebuild retrains on what is pending and allocates exactly what it holds.
REBUILD_AFTER = 4


def prefix_signature(text: str) -> tuple[int, ...]:
    """Hashes of the text's prefixes at ``PREFIX_LEVELS`` (the whole text at the last)."""
    sig: list[int] = []
    for level in PREFIX_LEVELS:
        sig.append(hash(text[:level]))
        if level >= len(text):
            break
    return tuple(sig)


def shared_prefix_chars(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """A lower bound of the characters two prompts share at the start (0, 32, 64, ...)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return PREFIX_LEVELS[n - 1] if n else 0


def estimate_tokens(text: str) -> int:
    """A quick estimate of a prompt's tokens (about four characters each)."""
    return len(text) // CHARS_PER_TOKEN + 1


def estimate_job_tokens(spec: JobSpec, text: str) -> int:
    """A quick estimate of a job's prompt tokens: its text (``spec.text``, where an image
    is an ``[image]`` mark) as ``estimate_tokens``, plus each image by its stated token
    rule (``jobs.chat.IMAGE_TOKENS``, never its bytes) and the tools' definitions and the
    response schema as text (``jobs.chat.extra_tokens``)."""
    if spec.messages is None and spec.tools is None and spec.response_format is None:
        return estimate_tokens(text)
    return estimate_tokens(text) + extra_tokens(spec.messages, spec.tools,
                                                spec.response_format)


@dataclass(slots=True, eq=False)
class PendingJob:
    """A job waiting in the pool (what the policy needs, not the prompt itself)."""

    id: str
    key: str
    priority: int
    tenant: str
    created_at: float
    deadline: float | None
    tokens: int
    prefix: tuple[int, ...]
    seq: int = -1
    cls: int = -1

    def urgency(self, horizon: float) -> tuple[int, float]:
        """Sort key inside a class: ``(0, deadline)``, or ``(1, arrival + horizon)`` for a
        job without a deadline, which so comes after every job with one."""
        if self.deadline is not None:
            return (0, self.deadline)
        return (1, self.created_at + horizon)


class Group:
    """Pending jobs of one compatibility key and one class."""

    def __init__(self, key: str, cls: int, dim: int, horizon: float,
                 aging_s: float = math.inf) -> None:
        self.key = key
        self.cls = cls
        self.dim = dim
        self.horizon = horizon
        self.aging_s = aging_s
        self.jobs: dict[int, PendingJob] = {}
        self.by_tenant: dict[str, SortedList] = {}
        self.by_deadline: SortedList = SortedList()
        #: (time the job is due for promotion to the next class, seq)
        self.by_promotion: SortedList = SortedList()
        self.index: faiss.Index = _flat_index(dim)
        #: Prefix family -> its jobs' seqs, in arrival order.
        self.families: dict[int, dict[int, None]] = {}
        self.approximate = False
        self._quantizer: faiss.Index | None = None
        #: Jobs added since the index was built.
        self.added_since_build = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, jobs: Sequence[PendingJob], vectors: Vectors) -> None:
        """Add jobs with their vectors (rows of ``vectors``)."""
        ids = np.fromiter((j.seq for j in jobs), dtype=np.int64, count=len(jobs))
        for job in jobs:
            job.cls = self.cls
            self.jobs[job.seq] = job
            self.by_tenant.setdefault(job.tenant, SortedList()).add(
                (*job.urgency(self.horizon), job.seq))
            if job.deadline is not None:
                self.by_deadline.add((job.deadline, job.seq))
            if self.cls > 0 and self.aging_s < math.inf:
                self.by_promotion.add((self._promote_at(job), job.seq))
            family = family_of(job)
            if family is not None:
                self.families.setdefault(family, {})[job.seq] = None
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self.added_since_build += len(jobs)
        if not self.approximate and len(self.jobs) > APPROX_THRESHOLD:
            self._to_approximate()
        elif self.added_since_build > REBUILD_AFTER * max(len(self.jobs), APPROX_THRESHOLD):
            self.rebuild()

    def remove(self, seqs: Sequence[int]) -> list[PendingJob]:
        """Remove jobs by seq; return those that were here."""
        gone: list[PendingJob] = []
        for seq in seqs:
            job = self.jobs.pop(seq, None)
            if job is None:
                continue
            gone.append(job)
            tenant_jobs = self.by_tenant[job.tenant]
            tenant_jobs.remove((*job.urgency(self.horizon), seq))
            if not tenant_jobs:
                del self.by_tenant[job.tenant]
            if job.deadline is not None:
                self.by_deadline.remove((job.deadline, seq))
            if self.cls > 0 and self.aging_s < math.inf:
                self.by_promotion.remove((self._promote_at(job), seq))
            family = family_of(job)
            if family is not None:
                members = self.families[family]
                del members[seq]
                if not members:
                    del self.families[family]
        if gone:
            self.index.remove_ids(np.fromiter(  # type: ignore[arg-type]
                (j.seq for j in gone), dtype=np.int64, count=len(gone)))
        return gone

    def _promote_at(self, job: PendingJob) -> float:
        """When the job has waited one ``aging_s`` per class it climbed, plus one."""
        return job.created_at + self.aging_s * (job.priority - self.cls + 1)

    def due_for_promotion(self, now: float) -> list[PendingJob]:
        """Jobs that have waited long enough to move up a class."""
        return [self.jobs[seq] for at, seq in self.by_promotion.irange(maximum=(now, 2**62))]

    def vectors(self, seqs: Sequence[int] | np.ndarray) -> Vectors:
        """The stored vectors of jobs (rows in the order of ``seqs``)."""
        ids = np.asarray(seqs, dtype=np.int64)
        return np.asarray(self.index.reconstruct_batch(ids), dtype=np.float32)

    def search(self, queries: Vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` nearest jobs per query: (similarities, seqs; -1 where none)."""
        k = max(1, min(k, len(self.jobs)))
        sims, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, ids

    def oldest(self) -> float:
        """Arrival time of the longest-waiting job (first in insertion order)."""
        return next(iter(self.jobs.values())).created_at

    def rebuild(self) -> None:
        """Build the index again from the pending jobs: an inverted file trained on them
        when the group is large, else a flat index."""
        if len(self.jobs) > APPROX_THRESHOLD:
            self._to_approximate()
            return
        seqs = np.fromiter(self.jobs.keys(), dtype=np.int64, count=len(self.jobs))
        vecs = self.vectors(seqs)
        index = _flat_index(self.dim)
        if len(seqs):
            index.add_with_ids(vecs, seqs)
        self.index, self._quantizer, self.approximate = index, None, False
        self.added_since_build = 0

    def _to_approximate(self) -> None:
        """Build the index as an inverted file trained on the pending jobs (the group is
        large)."""
        seqs = np.fromiter(self.jobs.keys(), dtype=np.int64, count=len(self.jobs))
        vecs = self.vectors(seqs)
        nlist = int(min(4096, max(64, math.sqrt(len(seqs)) * 2)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vecs[np.random.default_rng(0).choice(len(vecs), min(len(vecs), nlist * 40),
                                                      replace=False)]
        ivf.train(sample)
        ivf.nprobe = 16
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        ivf.add_with_ids(vecs, seqs)
        self._quantizer = quantizer  # the index does not own its quantizer: keep it alive
        self.index = ivf
        self.approximate = True
        self.added_since_build = 0


def _flat_index(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


@dataclass
class Pool:
    """All pending jobs, by (key, class), with the per-tenant service counters."""

    dim: int
    horizons: tuple[float, ...]
    #: A job moves up one class per ``aging_s`` seconds waited (inf: never).
    aging_s: float = math.inf
    groups: dict[tuple[str, int], Group] = field(default_factory=dict)
    by_id: dict[str, PendingJob] = field(default_factory=dict)
    #: Jobs served per (key, class, tenant), for weighted fair sharing.
    served: dict[tuple[str, int, str], float] = field(default_factory=dict)
    #: Pending jobs per (key, prefix level, prefix hash), for levels from COUNTED_FROM.
    prefixes: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    _seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self.by_id)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.by_id

    def group(self, key: str, cls: int) -> Group:
        """The group of (key, class), created empty if new."""
        g = self.groups.get((key, cls))
        if g is None:
            g = self.groups[(key, cls)] = Group(key, cls, self.dim, self.horizons[cls],
                                                self.aging_s)
        return g

    def add(self, jobs: Sequence[PendingJob], vectors: Vectors, *,
            cls: Sequence[int] | None = None) -> None:
        """Add new jobs (rows of ``vectors``) to their groups; known ids are ignored."""
        buckets: dict[tuple[str, int], list[int]] = {}
        for i, job in enumerate(jobs):
            if job.id in self.by_id:
                continue
            job.seq = next(self._seq)
            self.by_id[job.id] = job
            self._count_prefix(job, 1)
            target = cls[i] if cls is not None else job.priority
            buckets.setdefault((job.key, target), []).append(i)
        for (key, c), rows in buckets.items():
            self.group(key, c).add([jobs[i] for i in rows], vectors[rows])

    def remove(self, job_ids: Sequence[str]) -> list[PendingJob]:
        """Remove jobs by id (sent, expired, cancelled); return those that were pending."""
        per_group: dict[tuple[str, int], list[int]] = {}
        for job_id in job_ids:
            job = self.by_id.pop(job_id, None)
            if job is not None:
                per_group.setdefault((job.key, job.cls), []).append(job.seq)
                self._count_prefix(job, -1)
        gone: list[PendingJob] = []
        for gk, seqs in per_group.items():
            g = self.groups[gk]
            removed = g.remove(seqs)
            gone += removed
            for tenant in {j.tenant for j in removed} - g.by_tenant.keys():
                self.served.pop((gk[0], gk[1], tenant), None)
            if not g.jobs:
                del self.groups[gk]
        return gone

    def _count_prefix(self, job: PendingJob, delta: int) -> None:
        for level in range(COUNTED_FROM, len(job.prefix)):
            k = (job.key, level, job.prefix[level])
            n = self.prefixes[k] + delta
            if n > 0:
                self.prefixes[k] = n
            else:
                del self.prefixes[k]

    def pending_prefix_chars(self, jobs: Sequence[PendingJob]) -> int:
        """The longest prefix of ``jobs[0]`` (1,024 characters or more) that pending jobs
        other than ``jobs`` share; 0 if none does."""
        seed = jobs[0]
        for level in range(len(seed.prefix) - 1, COUNTED_FROM - 1, -1):
            h = seed.prefix[level]
            inside = sum(1 for j in jobs if len(j.prefix) > level and j.prefix[level] == h)
            if self.prefixes.get((seed.key, level, h), 0) > inside:
                return PREFIX_LEVELS[level]
        return 0

    def promote(self, now: float) -> int:
        """Promote jobs by one class per ``aging_s`` waited; return how many moved.

        Classes are visited lowest first, so a job that waited several bounds climbs
        several classes in one call.
        """
        moved = 0
        for (key, c) in sorted(self.groups, key=lambda gk: -gk[1]):
            g = self.groups.get((key, c))
            if g is None or c == 0:
                continue
            aged = g.due_for_promotion(now)
            if not aged:
                continue
            vecs = g.vectors([j.seq for j in aged])
            g.remove([j.seq for j in aged])
            if not g.jobs:
                del self.groups[(key, c)]
            self.group(key, c - 1).add(aged, vecs)
            moved += len(aged)
        return moved

    def charge(self, charges: dict[tuple[str, int, str], float]) -> None:
        """Add served work to tenants' counters (the policy returns the charges)."""
        for k, v in charges.items():
            self.served[k] = self.served.get(k, 0.0) + v

    def classes(self) -> list[int]:
        """Classes with pending jobs, highest first."""
        return sorted({c for _, c in self.groups})

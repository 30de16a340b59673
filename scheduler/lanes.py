"""Jobs waiting in the scheduler to join a provider batch (the half-price lane), and the
pure rule of when a provider batch leaves: ``plan_lane(pending, now, settings, full)``.

Lane jobs are grouped by deployment (``provider|model``: one provider batch holds one
model; its requests may differ in parameters), and inside it by prefix family (the
first 256 characters: one system prompt or template), since the providers apply prompt
caching inside their batch endpoints too. A deployment's jobs leave as provider batches:

1. **Full.** At the provider's limits (``jobs.lanes.Endpoint``: requests, and bytes
   with a tenth kept spare for the provider's framing), a batch leaves at once.
   Families go whole into a batch (arrival order of their first job); a family larger
   than a batch is cut.
2. **Waited.** Once its oldest job has waited ``jobs.lanes.wait_s`` (the bulk class's
   longest wait by default), everything the deployment has leaves.
3. **No room.** When the scheduler's pool is full (``full``: more jobs wait in Redis than
   it may hold), everything leaves at once: waiting longer gathers nothing.

Pure: no Redis, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from config.settings import Settings
from jobs.lanes import endpoint, wait_s
from jobs.models import JobSpec
from scheduler.pool import FAMILY_LEVEL, prefix_signature

#: Share of the provider's byte limit a provider batch may fill (the rest is spare for
#: each line's framing and for our estimate's error).
BYTES_FILL = 0.9


@dataclass(frozen=True, slots=True)
class LaneJob:
    """A job waiting to join a provider batch."""

    id: str
    tenant: str
    deployment: str
    created_at: float
    #: The request's size, estimated from its spec (a line of the provider's input).
    size: int
    #: Its prefix family (None: a prompt too short to have one).
    family: int | None


@dataclass(frozen=True, slots=True)
class LaneBatch:
    """A provider batch to send now."""

    deployment: str
    jobs: tuple[LaneJob, ...]
    reason: str

    @property
    def size(self) -> int:
        return sum(j.size for j in self.jobs)


def lane_job(spec: JobSpec, spec_json: str | None = None) -> LaneJob:
    """The lane's view of an accepted job."""
    signature = prefix_signature(spec.text)
    size = len(spec_json if spec_json is not None else spec.model_dump_json()) + 256
    return LaneJob(id=spec.id, tenant=spec.tenant, deployment=f"{spec.provider}|{spec.model}",
                   created_at=spec.created_at, size=size,
                   family=signature[FAMILY_LEVEL] if len(signature) > FAMILY_LEVEL else None)


@dataclass
class LanePending:
    """Lane jobs per deployment, in arrival order."""

    by_deployment: dict[str, dict[str, LaneJob]] = field(default_factory=dict)
    _where: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._where

    def add(self, jobs: Iterable[LaneJob]) -> None:
        for job in jobs:
            if job.id not in self._where:
                self.by_deployment.setdefault(job.deployment, {})[job.id] = job
                self._where[job.id] = job.deployment

    def remove(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            dep = self._where.pop(job_id, None)
            if dep is not None:
                jobs = self.by_deployment[dep]
                jobs.pop(job_id, None)
                if not jobs:
                    del self.by_deployment[dep]

    def oldest(self) -> float | None:
        """When the oldest job waiting arrived (None: none waits)."""
        firsts = [next(iter(jobs.values())).created_at for jobs in self.by_deployment.values()]
        return min(firsts) if firsts else None


def plan_lane(pending: LanePending, now: float, settings: Settings,
              full: bool = False) -> list[LaneBatch]:
    """The provider batches to send now (the rules of the module). Reads ``pending``;
    changes nothing."""
    out: list[LaneBatch] = []
    longest = wait_s(settings)
    for dep, jobs in pending.by_deployment.items():
        provider, _, model = dep.partition("|")
        found = endpoint(settings, provider, model)
        cap = (found.max_requests, int(found.max_bytes * BYTES_FILL)) if found else (
            settings.batch_api_max_requests or 50_000, 200 * 1024 * 1024)
        parts = _split(_by_family(jobs.values()), *cap)
        oldest = next(iter(jobs.values())).created_at
        waited = now - oldest >= longest
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if not last:
                out.append(LaneBatch(dep, tuple(part), "full"))
            elif full or waited or found is None:
                out.append(LaneBatch(dep, tuple(part), "room" if full else "wait"))
            elif len(part) >= cap[0] or sum(j.size for j in part) >= cap[1]:
                out.append(LaneBatch(dep, tuple(part), "full"))
    return out


def _by_family(jobs: Iterable[LaneJob]) -> list[list[LaneJob]]:
    """Jobs as families, in the arrival order of each family's first job (a job without
    a family is a family of its own)."""
    families: dict[object, list[LaneJob]] = {}
    for job in jobs:
        key: object = job.family if job.family is not None else ("alone", job.id)
        families.setdefault(key, []).append(job)
    return list(families.values())


def _split(families: Sequence[list[LaneJob]], max_jobs: int,
           max_bytes: int) -> list[list[LaneJob]]:
    """Families packed into batches within the limits, whole where they fit."""
    parts: list[list[LaneJob]] = []
    current: list[LaneJob] = []
    size = 0
    for family in families:
        family_size = sum(j.size for j in family)
        if current and (len(current) + len(family) > max_jobs
                        or size + family_size > max_bytes):
            parts.append(current)
            current, size = [], 0
        for job in family:  # a family larger than a batch is cut
            if current and (len(current) >= max_jobs or size + job.size > max_bytes):
                parts.append(current)
                current, size = [], 0
            current.append(job)
            size += job.size
    if current:
        parts.append(current)
    return parts

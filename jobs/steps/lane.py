"""The half-price lane's steps: the scheduler claims jobs for a provider batch (a
provider's own batch endpoint), and whoever learns that a job must run on the fast path
after all (a line that failed, a provider batch that expired or was cancelled) puts it
back into intake. A provider batch is listed in ``pb:lanes`` from its claim to its end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from config import keys
from jobs.models import JobSpec
from jobs.steps.base import Steps


class LaneSteps(Steps):
    """LaneSteps: see the module."""

    def lane_claim(self, token: str, batch_id: str, jobs: Sequence[tuple[str, str]],
                   now: float) -> list[str] | None:
        """Claim ``(job id, tenant)`` pairs still QUEUED for the provider batch
        ``batch_id`` (AT_PROVIDER, out of intake); the ids claimed, or None without the
        lease."""
        job_keys: list[str] = []
        for job_id, tenant in jobs:
            job_keys += [keys.job(job_id), keys.tenant_pending(tenant)]
        reply = self._lane_claim(keys=[keys.SCHEDULER_LEASE, keys.LANES, keys.INTAKE,
                                       *job_keys],
                                 args=[token, batch_id, now, *(j for j, _ in jobs)])
        if reply == -1:
            return None
        return [str(x) for x in reply]

    def lane_return(self, batch_id: str, specs: Sequence[JobSpec]) -> list[str]:
        """Put jobs of the provider batch ``batch_id`` back into intake for the fast path,
        each with its spec (``lane`` "fast"); the ids moved (a job no longer in the
        provider batch is left alone)."""
        moved: list[str] = []
        for start in range(0, len(specs), 500):
            part = specs[start:start + 500]
            job_keys: list[str] = []
            args: list[Any] = [batch_id]
            for spec in part:
                job_keys += [keys.job(spec.id), keys.tenant_pending(spec.tenant)]
                args += [spec.id, int(spec.priority), spec.tenant,
                         "" if spec.deadline is None else repr(spec.deadline),
                         spec.model_dump_json()]
            reply = self._lane_return(keys=[keys.INTAKE, *job_keys], args=args)
            moved += [s.id for s, flag in zip(part, reply, strict=True) if int(flag)]
        return moved

    def lane_open(self) -> dict[str, float]:
        """The provider batches claimed and not yet closed, with their claim times."""
        raw: Any = self.r.zrange(keys.LANES, 0, -1, withscores=True)
        return {str(batch_id): float(at) for batch_id, at in raw}

    def lane_closed(self, batch_id: str) -> None:
        """The provider batch is over: it leaves ``pb:lanes``."""
        self.r.zrem(keys.LANES, batch_id)

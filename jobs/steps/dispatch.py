"""Dispatch: the scheduler's steps. Read intake and events, hold the lease, claim jobs for
a batch (fenced by the lease; the batch stays in the outbox until it starts), take jobs
to expire, put a lost batch's jobs back, and what is in flight."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from config import keys
from jobs.models import IntakeEntry, JobSpec
from jobs.steps.base import Steps


@dataclass(frozen=True, slots=True)
class Reading:
    """What the scheduler reads at the start of a tick (``Dispatch.read_intake``)."""

    entries: list[IntakeEntry]
    events: list[tuple[str, dict[str, str]]]
    #: ``pb:workers``: each worker's pool size and heartbeat.
    workers: dict[str, str]
    #: Members of the in-flight set (``class:batch id``).
    inflight: list[str]
    #: Length of each broker queue, in ``keys.QUEUES`` order.
    queued: list[int]


class Dispatch(Steps):
    """Dispatch: see the module."""

    def read_intake(self, after: str, count: int, block_ms: int | None, events_after: str,
                    *, stale_before: float) -> Reading:
        """Intake entries after ``after`` and events ``(sid, fields)`` after ``events_after``,
        blocking up to ``block_ms`` until either stream has something new; in the same
        round trip, after the read, the cluster's capacity (workers, batches in flight,
        once those started before ``stale_before`` are dropped, and the broker's queue
        lengths)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xread({keys.INTAKE: after, keys.EVENTS: events_after}, count=count, block=block_ms)
        pipe.hgetall(keys.WORKERS)
        pipe.zremrangebyscore(keys.INFLIGHT, "-inf", stale_before)
        pipe.zrange(keys.INFLIGHT, 0, -1)
        for name in keys.QUEUES:
            pipe.llen(name)
        read, workers, _, inflight, *queued = self._at_once(pipe)
        entries: list[IntakeEntry] = []
        events: list[tuple[str, dict[str, str]]] = []
        for stream, items in read or []:
            for sid, fields in items:
                if stream == keys.INTAKE:
                    entries.append(IntakeEntry.parse(sid, fields))
                else:
                    events.append((sid, fields))
        return Reading(entries, events, workers, [str(m) for m in inflight],
                       [int(n) for n in queued])

    def last_event_id(self) -> str:
        """Id of the newest event (so a starting scheduler skips older ones)."""
        last: Any = self.r.xrevrange(keys.EVENTS, count=1)
        return str(last[0][0]) if last else "0-0"

    def load(self, job_ids: Sequence[str]) -> list[tuple[JobSpec | None, str | None]]:
        """``(spec, state)`` of each job; ``(None, None)`` for a job Redis does not hold."""
        return [(spec, state) for spec, state, _ in self.load_owned(job_ids)]

    def load_owned(self, job_ids: Sequence[str],
                   ) -> list[tuple[JobSpec | None, str | None, str | None]]:
        """``(spec, state, batch id)`` of each job (all None for a job Redis does not hold)."""
        out: list[tuple[JobSpec | None, str | None, str | None]] = []
        for start in range(0, len(job_ids), 1000):  # one Lua step per 1,000
            part = job_ids[start:start + 1000]
            flat: Any = self._load(keys=[keys.job(j) for j in part])
            for i in range(0, len(flat), 3):
                spec, state, batch = flat[i:i + 3]
                out.append((JobSpec.model_validate_json(spec) if spec else None, state, batch))
        return out

    def server_id(self) -> str:
        """The ``run_id`` of the Redis server answering: another after a failover or a
        restart."""
        info: Any = self.r.info("server")
        return str(info.get("run_id", ""))

    def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take or renew the scheduler lease."""
        return bool(self._lease(keys=[keys.SCHEDULER_LEASE], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, token: str) -> None:
        """Give the scheduler lease up."""
        self._release(keys=[keys.SCHEDULER_LEASE], args=[token])

    def claim(self, token: str, batch_id: str, meta: str, jobs: Sequence[tuple[str, str]],
              now: float, cls: int) -> list[str] | None:
        """Claim ``(job id, tenant)`` pairs still QUEUED for a batch (out of intake, the
        batch into the outbox until one of its sends starts); None without the lease."""
        job_keys: list[str] = []
        for job_id, tenant in jobs:
            job_keys += [keys.job(job_id), keys.tenant_pending(tenant)]
        reply = self._claim(keys=[keys.SCHEDULER_LEASE, keys.OUTBOX, keys.INFLIGHT, keys.INTAKE,
                                  *job_keys],
                            args=[token, batch_id, meta, now, keys.inflight_member(cls, batch_id),
                                  *(j for j, _ in jobs)])
        if reply == -1:
            return None
        return [str(x) for x in reply]

    def take_to_expire(self, token: str, jobs: Sequence[tuple[str, str]]) -> list[str] | None:
        """Take ``(job id, tenant)`` pairs still QUEUED out of intake to expire them, fenced
        by the lease (``TAKE_TO_EXPIRE``); the ids taken, or None without the lease."""
        if not jobs:
            return []
        job_keys: list[str] = []
        for job_id, tenant in jobs:
            job_keys += [keys.job(job_id), keys.tenant_pending(tenant)]
        reply = self._take_to_expire(
            keys=[keys.SCHEDULER_LEASE, keys.INTAKE, *job_keys],
            args=[token, f"expired-{uuid.uuid4().hex[:12]}", *(j for j, _ in jobs)])
        if reply == -1:
            return None
        return [str(x) for x in reply]

    def drop_from_outbox(self, batch_ids: Sequence[str]) -> None:
        """Batches that will not be sent again (no longer in flight) leave the outbox."""
        if batch_ids:
            self.r.hdel(keys.OUTBOX, *batch_ids)

    def outbox(self) -> dict[str, tuple[str, list[str]]]:
        """Batches claimed and not started (sent or not): ``{batch id: (meta JSON, job
        ids)}``."""
        out: dict[str, tuple[str, list[str]]] = {}
        raw: Any = self.r.hgetall(keys.OUTBOX)
        for batch_id, value in raw.items():
            meta, _, ids = value.rpartition("\n")
            out[batch_id] = (meta, ids.split(",") if ids else [])
        return out

    def states_and_batches(self, job_ids: Sequence[str],
                           ) -> list[tuple[str | None, str | None]]:
        """``(state, batch id)`` of each job in Redis (None where it has none)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), "state", "batch")
        return [(state, batch) for state, batch in pipe.execute()]

    def in_flight(self, batch_ids: Sequence[str]) -> set[str]:
        """Which of the batches are in flight (claimed and not finished)."""
        pipe = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            for cls in range(len(keys.QUEUES)):
                pipe.zscore(keys.INFLIGHT, keys.inflight_member(cls, batch_id))
        found = pipe.execute()
        n = len(keys.QUEUES)
        return {b for i, b in enumerate(batch_ids) if any(x is not None
                                                          for x in found[i * n:(i + 1) * n])}

    def requeue(self, spec: JobSpec, batch_id: str, token: str = "") -> bool | None:
        """Put a job left SCHEDULED or RUNNING by a lost batch back into intake; whether it
        did, or None when ``token`` no longer holds the scheduler lease ('': no fence, for
        tools run without a scheduler)."""
        done = int(self._requeue(
            keys=[keys.job(spec.id), keys.INTAKE, keys.tenant_pending(spec.tenant),
                  keys.SCHEDULER_LEASE],
            args=[spec.id, batch_id, int(spec.priority), spec.tenant,
                  "" if spec.deadline is None else repr(spec.deadline), token]))
        return None if done < 0 else bool(done)

    def states(self, job_ids: Sequence[str]) -> list[str | None]:
        """The Redis-side state of each job (None when Redis does not hold it)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "state")
        return list(pipe.execute())

"""Runs: a worker's steps. Start a batch's run (the first send wins), mark its jobs
RUNNING, split a poison batch, and end the run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from config import keys
from jobs.models import JobSpec
from jobs.steps.base import Steps


class Runs(Steps):
    """Runs: see the module."""

    def start_run(self, batch_id: str, send_id: str, retries: int, ttl_s: int, cls: int,
                  now: float) -> int | None:
        """The start of a batch's task, in one round trip: None when another send of the
        batch runs it (the first send to arrive wins, and a re-delivery of that same send,
        after a worker died, runs again); else its in-flight entry is refreshed to ``now``
        and the answer is how many of its deliveries followed a lost worker
        (``COUNT_DELIVERY``)."""
        lost = int(self._start_run(keys=[keys.batch_deliveries(batch_id),
                                         keys.batch_run(batch_id), keys.INFLIGHT],
                                   args=[retries, ttl_s, send_id, now,
                                         keys.inflight_member(cls, batch_id)]))
        return None if lost < 0 else lost

    def reassign(self, batch_id: str, moves: Sequence[tuple[str, str, int]],
                 now: float) -> list[bool]:
        """Move jobs of a batch to new batches ``(job id, new batch id, class)``, each
        counted in flight; return, per move, whether the job was still the batch's."""
        if not moves:
            return []
        args: list[str | float] = [batch_id, now]
        for _, new_id, cls in moves:
            args += [new_id, keys.inflight_member(cls, new_id)]
        reply = self._reassign(keys=[keys.INFLIGHT, *(keys.job(j) for j, _, _ in moves)],
                               args=args)
        return [bool(x) for x in reply]

    def load_and_mark(self, batch_id: str, job_ids: Sequence[str],
                      ) -> tuple[list[JobSpec | None], list[str]]:
        """Mark the batch's jobs RUNNING, in one Lua step: each job's spec when it is now
        RUNNING (else None), and what marking it found (``MARK_RUNNING``)."""
        reply: Any = self._running(keys=[keys.job(j) for j in job_ids], args=[batch_id])
        states = [str(x) for x in reply[0::2]]
        return ([JobSpec.model_validate_json(s) if s else None for s in reply[1::2]], states)

    def batch_done(self, batch_id: str, cls: int,
                   event: dict[str, str | int | float] | None = None) -> None:
        """The batch is finished: it leaves the in-flight set (and, with ``event``, the
        scheduler is told its timing, in the same round trip: after the slot is freed, so
        the scheduler the event wakes finds the room to send the next batch)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(keys.INFLIGHT, keys.inflight_member(cls, batch_id))
        # Its run and delivery records are done with: a late second send of the batch
        # finds every job final and calls nobody.
        pipe.unlink(keys.batch_run(batch_id), keys.batch_deliveries(batch_id))
        if event:
            oldest = int((time.time() - keys.EVENTS_KEEP_S) * 1000)
            pipe.xadd(keys.EVENTS, event, minid=oldest, approximate=True)  # type: ignore[arg-type]
        pipe.execute()

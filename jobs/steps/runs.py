"""Runs: a worker's steps. Start a batch's run (the first send wins), mark its jobs
RUNNING, split a poison batch, and end the run."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from config import keys
from jobs.models import JobSpec
from jobs.steps.base import Steps


class Runs(Steps):
    """Runs: see the module."""

    def start_run(self, batch_id: str, send_id: str, retries: int, ttl_s: int, cls: int,
                  now: float, *, token: str | None = None, redelivered: bool = True,
                  ) -> int | None:
        """The start of a batch's task, in one round trip: None when this delivery may not
        run (another send of the batch won, or another worker runs this same delivery);
        else its in-flight entry is refreshed to ``now`` and the answer is how many of its
        deliveries followed a lost worker (``COUNT_DELIVERY``).

        ``token``: this delivery's own id (the same for a start tried again after a Redis
        error; a new one by default). ``redelivered``: the broker marked the message as
        delivered before (its worker was lost), so it takes the run over."""
        return self.start_run_replicated(batch_id, send_id, retries, ttl_s, cls, now,
                                         token=token, redelivered=redelivered)[0]

    def start_run_replicated(self, batch_id: str, send_id: str, retries: int, ttl_s: int,
                             cls: int, now: float, *, token: str | None = None,
                             redelivered: bool = True, replicas: int = 0,
                             wait_ms: int = 0) -> tuple[int | None, bool]:
        """``start_run``, then (on the same connection, in the same round trip) Redis
        ``WAIT`` for ``replicas`` replicas up to ``wait_ms``: whether they hold the start.
        A primary that dies before they do raises a connection error, never a "yes"."""
        pipe = self.r.pipeline(transaction=False)
        self._start_run(keys=[keys.batch_deliveries(batch_id), keys.batch_run(batch_id),
                              keys.INFLIGHT, keys.OUTBOX],
                        args=[retries, ttl_s, send_id, now, keys.inflight_member(cls, batch_id),
                              token or uuid.uuid4().hex, "1" if redelivered else "0",
                              batch_id],
                        client=pipe)
        if replicas > 0:
            pipe.execute_command("WAIT", replicas, wait_ms)  # type: ignore[no-untyped-call]
        replies = self._at_once(pipe)
        lost = int(replies[0])
        return (None if lost < 0 else lost), replicas <= 0 or int(replies[1]) >= replicas

    def reassign(self, batch_id: str, moves: Sequence[tuple[str, str, int]],
                 now: float) -> list[bool]:
        """Move jobs of a batch to new batches ``(job id, new batch id, class)``, each
        counted in flight and in the outbox until it starts; return, per move, whether the
        job was still the batch's."""
        if not moves:
            return []
        args: list[str | float] = [batch_id, now]
        for job_id, new_id, cls in moves:
            args += [new_id, keys.inflight_member(cls, new_id), f'{{"cls": {cls}}}\n{job_id}']
        reply = self._reassign(keys=[keys.INFLIGHT, keys.OUTBOX,
                                     *(keys.job(j) for j, _, _ in moves)], args=args)
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
        # Out of the outbox (its start took it out already; this keeps the outbox exact
        # for a caller that ends a batch that never started, as a tool may).
        pipe.hdel(keys.OUTBOX, batch_id)
        # Its run and delivery records are done with: a late second send of the batch
        # finds every job final and calls nobody.
        pipe.unlink(keys.batch_run(batch_id), keys.batch_deliveries(batch_id))
        if event:
            oldest = int((time.time() - keys.EVENTS_KEEP_S) * 1000)
            pipe.xadd(keys.EVENTS, event, minid=oldest, approximate=True)  # type: ignore[arg-type]
        pipe.execute()

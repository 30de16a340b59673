"""Results: storing final results (first wins), the stream of stored ids, reading
results back, and the answers of jobs the cache answered at submit."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from config import keys
from jobs import stats, streams
from jobs.models import JobResult
from jobs.steps.base import Steps
from jobs.steps.meta import celery_meta, result_from_meta

#: A final job's hash is kept this long after its result, for status reads (never longer
#: than the result itself).
FINAL_JOB_TTL_S = 24 * 3600
#: Results stored per Lua step.
FINISH_CHUNK = 500


class Results(Steps):
    """Results: see the module."""

    def finish(self, results: Sequence[JobResult], tenants: Sequence[str], *,
               result_ttl_s: int, classes: Sequence[int] | None = None,
               dumped: Mapping[str, str] | None = None, submitted: bool = False,
               hit: str = "", money: Mapping[str, str] | None = None) -> list[bool | str]:
        """Store final results (first wins), ``FINISH_CHUNK`` per Lua step
        (``jobs/lua/finish_many.lua``): the result backend, the job's state, its stream's
        end, the stream of stored ids and the counters, under each job's class
        (``classes``; else the class Redis holds for the job). Per result: False when a
        result was there, else True, or the cache key the job leads (identical requests
        wait for it). ``submitted``: jobs answered at their submit (no job hash; counted
        as submitted here); ``hit``: the cache that answered them. ``dumped``: the
        results' JSON by id, when the caller has it already. ``money``: by id, what a job
        spent and saved (``jobs.stats.money_fields``), counted with its result. Callers go
        through ``jobs.outcomes.record_results``."""
        out: list[bool | str] = []
        recent = keys.recent(stats.bucket_of(time.time()))
        cls_of = [str(c) for c in classes] if classes is not None else [""] * len(results)
        for start in range(0, len(results), FINISH_CHUNK):
            part = list(zip(results[start:start + FINISH_CHUNK],
                            tenants[start:start + FINISH_CHUNK],
                            cls_of[start:start + FINISH_CHUNK], strict=True))
            job_keys: list[str] = [keys.INTAKE, keys.STATS, recent, keys.DONE]
            args: list[str | int] = [result_ttl_s, min(FINAL_JOB_TTL_S, result_ttl_s),
                                     stats.BUCKET_TTL_S,
                                     int((time.time() - keys.DONE_KEEP_S) * 1000),
                                     streams.MAXLEN]
            for res, tenant, cls in part:
                job_keys += [keys.job(res.id), keys.celery_result(res.id),
                             keys.tenant_pending(tenant), keys.job_stream(res.id)]
                args += [res.id, celery_meta(res, dumped.get(res.id) if dumped else None),
                         res.state.value, cls,
                         stats.label(tenant, res.provider, res.model),
                         "1" if res.missed_deadline else "0", "1" if submitted else "0", hit,
                         money.get(res.id, "") if money else ""]
            out += [x if isinstance(x, str) else bool(x)
                    for x in self._finish_many(keys=job_keys, args=args)]
        return out

    def done_cursor(self) -> str:
        """The id of the newest entry of the stream of stored results ('0-0' if none)."""
        last: Any = self.r.xrevrange(keys.DONE, count=1)
        return str(last[0][0]) if last else "0-0"

    def wait_done(self, after: str, block_ms: int, count: int = 1000,
                  ) -> tuple[str, list[str]]:
        """Ids whose results were stored after stream entry ``after`` (waiting up to
        ``block_ms`` for some), and the id of the last entry read."""
        found: Any = self.r.xread({keys.DONE: after}, count=count, block=block_ms)
        ids: list[str] = []
        for _, entries in found or ():
            for sid, fields in entries:
                after = str(sid)
                ids += str(fields.get("ids", "")).split(",")
        return after, [i for i in ids if i]

    def results(self, job_ids: Sequence[str]) -> list[JobResult | None]:
        """Stored results of the jobs (None where there is none yet)."""
        if not job_ids:
            return []
        raws: Any = self.r.mget([keys.celery_result(j) for j in job_ids])
        return [result_from_meta(raw) if raw else None for raw in raws]

    def forget(self, job_ids: Sequence[str]) -> None:
        """Delete final jobs from Redis at once (their hash, result and stream), for a
        caller that owns this Redis and has read the results (``promptbatch run``: the SQL
        store keeps them), so that Redis holds only the work in flight."""
        for start in range(0, len(job_ids), 1000):
            part = job_ids[start:start + 1000]
            self.r.unlink(*(name for j in part for name in
                            (keys.job(j), keys.celery_result(j), keys.job_stream(j))))

    def have_results(self, job_ids: Sequence[str]) -> list[bool]:
        """Whether the result backend holds each job's result."""
        have = [True] * len(job_ids)
        for start in range(0, len(job_ids), 1000):  # one Lua step per 1,000
            part = job_ids[start:start + 1000]
            for i in self._missing(keys=[keys.celery_result(j) for j in part]):
                have[start + int(i) - 1] = False
        return have

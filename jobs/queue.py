"""Redis operations on jobs: enqueue, claim, cancel, finish. Every multi-key step is Lua.

Layout (names in ``config.keys``): a job is a hash ``pb:job:{id}`` (``spec`` JSON,
``state``, ``sid`` of its intake entry, ``batch``); ``pb:intake`` is a stream holding one
entry per job not yet sent; a job's result lives in Celery's own result key
``celery-task-meta-{id}``, so ``AsyncResult(job_id)`` works for any Celery user.
"""

from __future__ import annotations

import fnmatch
import json
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from config import keys
from jobs import lua, stats, streams
from jobs.models import IntakeEntry, JobResult, JobSpec, JobState

#: Celery state and exception type used for each final state.
_CELERY_OUTCOME: dict[JobState, tuple[str, str | None]] = {
    JobState.SUCCEEDED: ("SUCCESS", None),
    JobState.FAILED: ("FAILURE", "JobFailed"),
    JobState.EXPIRED: ("FAILURE", "JobExpired"),
    JobState.CANCELLED: ("FAILURE", "JobCancelled"),
}

#: Redis states of a leader that will still hand its followers their answer: staged by
#: its submit, waiting, sent, or running.
_LEADING_STATES = frozenset({"STAGED", "QUEUED", "SCHEDULED", "RUNNING"})
#: A final job's hash is kept this long after its result, for status reads (never longer
#: than the result itself).
FINAL_JOB_TTL_S = 24 * 3600
#: Results stored per Lua step.
FINISH_CHUNK = 500
#: A withdrawn submit's tombstone lives this long: past any late copy of the submit, and
#: past the reconciler's next passes (which end a withdrawn job left in SQL CANCELLED).
TOMBSTONE_TTL_S = 3600


def connect(url: str, *, socket_timeout: float = 10.0,
            connect_timeout: float = 5.0, fail_fast: bool = False) -> redis.Redis:
    """A Redis client with timeouts and health checks, so nothing hangs on a stalled server.

    ``fail_fast``: no reconnect-and-retry, so a caller answering users (the API) learns
    within ``socket_timeout`` that Redis is down.
    """
    extra: dict[str, Any] = {}
    if fail_fast:
        extra["retry"] = Retry(NoBackoff(), 0)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        socket_keepalive=True,
        health_check_interval=10,
        retry_on_timeout=False,
        **extra,
    )


def celery_meta(result: JobResult, public: str | None = None) -> str:
    """The result as Celery's Redis backend stores it, with our full record.

    A succeeded job's record is Celery's ``result``; a job that did not succeed has
    Celery's exception there, and the record under ``promptbatch``: each record is in the
    meta once (a meta is written, published and read once per job). Assembled around
    pydantic's own JSON of the record (the hot path of every result, cache hits
    included): the same document ``json.dumps`` of the dict would give. ``public``: that
    JSON, when the caller has it already."""
    status, exc_type = _CELERY_OUTCOME[result.state]
    if public is None:
        public = result.model_dump_json()
    done = datetime.fromtimestamp(result.finished_at, UTC).isoformat()
    head = (f'{{"status":"{status}","traceback":null,"children":[],"date_done":"{done}",'
            f'"task_id":{orjson.dumps(result.id).decode()},')
    if exc_type is None:
        return f'{head}"result":{public}}}'
    error = orjson.dumps({"exc_type": exc_type, "exc_module": "jobs.errors",
                          "exc_message": [result.error or result.state.value]}).decode()
    return f'{head}"result":{error},"promptbatch":{public}}}'


def result_from_meta(raw: str) -> JobResult:
    """Our result record from a stored Celery meta (``celery_meta``)."""
    meta = orjson.loads(raw)
    return JobResult.model_validate(meta["promptbatch"] if "promptbatch" in meta
                                    else meta["result"])


@dataclass(frozen=True, slots=True)
class Reading:
    """What the scheduler reads at the start of a tick (``RedisQueue.read_intake``)."""

    entries: list[IntakeEntry]
    events: list[tuple[str, dict[str, str]]]
    #: ``pb:workers``: each worker's pool size and heartbeat.
    workers: dict[str, str]
    #: Members of the in-flight set (``class:batch id``).
    inflight: list[str]
    #: Length of each broker queue, in ``keys.QUEUES`` order.
    queued: list[int]


class RedisQueue:
    """The Redis side of a job's life."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._enqueue = client.register_script(lua.source("enqueue"))
        self._stage = client.register_script(lua.source("stage"))
        self._publish = client.register_script(lua.source("publish"))
        self._withdraw = client.register_script(lua.source("withdraw"))
        self._claim = client.register_script(lua.source("claim"))
        self._take_to_expire = client.register_script(lua.source("take_to_expire"))
        self._running = client.register_script(lua.source("mark_running"))
        self._reassign = client.register_script(lua.source("reassign"))
        self._requeue = client.register_script(lua.source("requeue"))
        self._start_run = client.register_script(lua.source("start_run"))
        self._missing = client.register_script(lua.source("missing"))
        self._load = client.register_script(lua.source("load"))
        self._finish_many = client.register_script(lua.source("finish_many"))
        self._cache_put = client.register_script(lua.source("cache_put"))
        self._coalesce = client.register_script(lua.source("coalesce"))
        self._take_followers = client.register_script(lua.source("take_followers"))
        self._release_followers = client.register_script(lua.source("release_followers"))
        self._cancel = client.register_script(lua.source("cancel"))
        self._set_results = client.register_script(lua.source("set_results"))
        self._lease = client.register_script(lua.source("lease"))
        self._release = client.register_script(lua.source("release"))

    # --- everyone, at start ------------------------------------------------------------

    def bind_store(self, store_id: str, where: str) -> None:
        """Check that this Redis is used with the job store ``store_id`` (publishing it if
        no process has yet); ``StoreMismatch`` if the others use another store."""
        from jobs.errors import StoreMismatch

        self.r.set(keys.STORE, json.dumps({"id": store_id, "where": where}), nx=True)
        theirs = json.loads(self.r.get(keys.STORE) or "{}")
        if theirs.get("id") != store_id:
            raise StoreMismatch(where, str(theirs.get("where")))

    # --- producers ----------------------------------------------------------------------

    def enqueue(self, specs: Sequence[JobSpec], *, ttl_s: int, max_pending: int) -> list[int]:
        """Write each job's payload and intake entry in one atomic step (pipelined).

        Returns per job: 1 enqueued, 0 already there, -1 refused (tenant over quota).
        """
        pipe = self.r.pipeline(transaction=False)
        for spec in specs:
            self._enqueue(
                keys=[keys.job(spec.id), keys.INTAKE, keys.tenant_pending(spec.tenant)],
                args=[spec.id, spec.model_dump_json(), ttl_s, max_pending, int(spec.priority),
                      spec.tenant, "" if spec.deadline is None else repr(spec.deadline)],
                client=pipe,
            )
        return [int(code) for code, _sid in pipe.execute()]

    def stage(self, specs: Sequence[JobSpec], *, ttl_s: int, max_pending: int,
              publish: bool = False, spec_json: Mapping[str, str] | None = None,
              ) -> list[int] | None:
        """Stage jobs in one atomic step: written and counted against their tenants'
        quotas, invisible to the scheduler until ``publish`` (or, with ``publish``, put
        into intake in the same step). None (nothing written) when a tenant would go over
        ``max_pending``; else per job 1 staged, 0 already there. ``spec_json``: the specs'
        JSON by id, when the caller has it."""
        job_keys: list[str] = [keys.INTAKE, keys.STATS, keys.recent(stats.bucket_of(time.time()))]
        args: list[str | int] = [ttl_s, max_pending, "1" if publish else "0",
                                 stats.BUCKET_TTL_S]
        for spec in specs:
            job_keys += [keys.job(spec.id), keys.tenant_pending(spec.tenant)]
            text = spec_json.get(spec.id) if spec_json else None
            args += [spec.id, text or spec.model_dump_json(), int(spec.priority), spec.tenant,
                     "" if spec.deadline is None else repr(spec.deadline),
                     stats.label(spec.tenant, spec.provider, spec.model)]
        reply = self._stage(keys=job_keys, args=args)
        if reply and int(reply[0]) == -1:
            return None
        return [int(x) for x in reply]

    def publish(self, job_ids: Sequence[str]) -> int:
        """Put staged jobs into intake, all in one atomic step; return how many."""
        if not job_ids:
            return 0
        recent = keys.recent(stats.bucket_of(time.time()))
        return int(self._publish(
            keys=[keys.INTAKE, keys.STATS, recent, *(keys.job(j) for j in job_ids)],
            args=[stats.BUCKET_TTL_S, *job_ids]))

    def withdraw(self, specs: Sequence[JobSpec]) -> list[str]:
        """Undo a failed submit: per job 'WITHDRAWN' (it will never run), or the state of
        a job the scheduler already took (it is accepted)."""
        job_keys: list[str] = []
        for spec in specs:
            job_keys += [keys.job(spec.id), keys.tenant_pending(spec.tenant)]
        reply = self._withdraw(keys=[keys.INTAKE, *job_keys],
                               args=[TOMBSTONE_TTL_S, *(s.id for s in specs)])
        return [str(x) for x in reply]

    def pending_count(self, tenant: str) -> int:
        """Jobs of ``tenant`` waiting to be sent."""
        return int(self.r.scard(keys.tenant_pending(tenant)))

    def cancel(self, job_id: str) -> str:
        """Mark a QUEUED or SCHEDULED job CANCELLED; return the state found ('' if unknown)."""
        return str(self._cancel(keys=[keys.job(job_id), keys.EVENTS], args=[job_id]))

    def cancel_many(self, job_ids: Sequence[str]) -> list[str]:
        """``cancel`` of each job, in one round trip; the states found."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            self._cancel(keys=[keys.job(job_id), keys.EVENTS], args=[job_id], client=pipe)
        return [str(x) for x in self._at_once(pipe)] if job_ids else []

    def _at_once(self, pipe: Any) -> list[Any]:
        """Run ``pipe`` (a non-transactional pipeline) in one round trip and return its
        replies (the first error is raised).

        redis-py first asks the server whether a pipeline's Lua scripts exist (a round trip
        of its own); here they run by their SHA1 straight away, and only on a server that
        lost them (a restart) are they loaded and the commands they failed run again, after
        the others: each command runs once."""
        scripts = list(pipe.scripts)
        pipe.scripts.clear()
        commands = list(pipe.command_stack)
        replies: list[Any] = list(pipe.execute(raise_on_error=False))
        missing = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
        if missing:
            for script in scripts:
                script.sha = str(self.r.script_load(script.script))
            again = self.r.pipeline(transaction=False)
            for i in missing:
                args, options = commands[i]
                again.execute_command(*args, **options)  # type: ignore[no-untyped-call]
            for i, reply in zip(missing, again.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    # --- scheduler ----------------------------------------------------------------------

    def read_intake(self, after: str, count: int, block_ms: int | None, events_after: str,
                    *, stale_before: float, acks: Sequence[str] = ()) -> Reading:
        """Intake entries after ``after`` and events ``(sid, fields)`` after ``events_after``,
        blocking up to ``block_ms`` until either stream has something new; in the same
        round trip, first ``ack_sent`` of the batches ``acks``, and
        after the read the cluster's capacity (workers, batches in flight, once those
        started before ``stale_before`` are dropped, and the broker's queue lengths)."""
        pipe = self.r.pipeline(transaction=False)
        if acks:
            self.ack_sent(acks, client=pipe)
        pipe.xread({keys.INTAKE: after, keys.EVENTS: events_after}, count=count, block=block_ms)
        pipe.hgetall(keys.WORKERS)
        pipe.zremrangebyscore(keys.INFLIGHT, "-inf", stale_before)
        pipe.zrange(keys.INFLIGHT, 0, -1)
        for name in keys.QUEUES:
            pipe.llen(name)
        read, workers, _, inflight, *queued = self._at_once(pipe)[1 if acks else 0:]
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

    def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take or renew the scheduler lease."""
        return bool(self._lease(keys=[keys.SCHEDULER_LEASE], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, token: str) -> None:
        """Give the scheduler lease up."""
        self._release(keys=[keys.SCHEDULER_LEASE], args=[token])

    def claim(self, token: str, batch_id: str, meta: str, jobs: Sequence[tuple[str, str]],
              now: float, cls: int, *, acks: Sequence[str] = ()) -> list[str] | None:
        """Claim ``(job id, tenant)`` pairs still QUEUED for a batch (out of intake, the
        batch into the outbox); None without the lease. ``acks``: ``ack_sent`` of these
        batches first, in the same round trip."""
        job_keys: list[str] = []
        for job_id, tenant in jobs:
            job_keys += [keys.job(job_id), keys.tenant_pending(tenant)]
        pipe = self.r.pipeline(transaction=False)
        if acks:
            self.ack_sent(acks, client=pipe)
        self._claim(keys=[keys.SCHEDULER_LEASE, keys.OUTBOX, keys.INFLIGHT, keys.INTAKE,
                          *job_keys],
                    args=[token, batch_id, meta, now, keys.inflight_member(cls, batch_id),
                          *(j for j, _ in jobs)], client=pipe)
        reply = self._at_once(pipe)[-1]
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

    def ack_sent(self, batch_ids: Sequence[str], client: Any = None) -> None:
        """After the sends: drop the batches from the outbox (in ``client``'s pipeline
        when given). Their jobs left intake when they were claimed."""
        (client or self.r).hdel(keys.OUTBOX, *batch_ids)

    def outbox(self) -> dict[str, tuple[str, list[str]]]:
        """Batches claimed but not confirmed sent: ``{batch id: (meta JSON, job ids)}``."""
        out: dict[str, tuple[str, list[str]]] = {}
        raw: Any = self.r.hgetall(keys.OUTBOX)
        for batch_id, value in raw.items():
            meta, _, ids = value.rpartition("\n")
            out[batch_id] = (meta, ids.split(",") if ids else [])
        return out

    # --- workers ------------------------------------------------------------------------

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

    # --- everyone -----------------------------------------------------------------------

    def finish(self, results: Sequence[JobResult], tenants: Sequence[str], *,
               result_ttl_s: int, classes: Sequence[int] | None = None) -> list[bool]:
        """Store final results (first wins), ``FINISH_CHUNK`` per Lua step; return, per
        result, whether it was stored. Each stored result is counted in the cluster's
        stats (``jobs.stats``) under its class (``classes``; else the class Redis holds
        for the job)."""
        return [bool(x) for x in self.finish_leading(results, tenants, result_ttl_s=result_ttl_s,
                                                     classes=classes)]

    def finish_leading(self, results: Sequence[JobResult], tenants: Sequence[str], *,
                       result_ttl_s: int, classes: Sequence[int] | None = None,
                       dumped: Mapping[str, str] | None = None) -> list[bool | str]:
        """``finish``, telling apart the stored results of jobs that identical requests
        wait for: their cache key instead of True. ``dumped``: the results' JSON by id,
        when the caller has it already."""
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
                         "1" if res.missed_deadline else "0"]
            out += [x if isinstance(x, str) else bool(x)
                    for x in self._finish_many(keys=job_keys, args=args)]
        return out

    # --- the result cache -------------------------------------------------------------

    def count_cache_hits(self, kind: str, specs: Sequence[JobSpec]) -> None:
        """Count jobs answered without a provider call of their own (``semantic``,
        ``coalesced``; ``publish_answers`` counts the ``exact`` ones) in the cluster's
        stats: one HINCRBY per distinct counter."""
        if not specs:
            return
        fields = Counter(f"c|{kind}|{int(s.priority)}|"
                         f"{stats.label(s.tenant, s.provider, s.model)}" for s in specs)
        pipe = self.r.pipeline(transaction=False)
        for name, n in fields.items():
            pipe.hincrby(keys.STATS, name, n)
        pipe.execute()

    def publish_answers(self, results: Sequence[JobResult], specs: Sequence[JobSpec], *,
                        result_ttl_s: int, kind: str = "exact",
                        dumped: Mapping[str, str] | None = None) -> None:
        """Results of new jobs the cache answered at submit (their store rows are final;
        they have no job hash and no intake entry): the result keys, and the counters
        (submitted, finished, cache hits), in one round trip. ``dumped``: each result's
        JSON when the caller has it already."""
        pipe = self.r.pipeline(transaction=False)
        for start in range(0, len(results), 1000):
            part = results[start:start + 1000]
            metas = [celery_meta(r, dumped.get(r.id) if dumped else None) for r in part]
            self._set_results(keys=[keys.celery_result(r.id) for r in part],
                              args=[result_ttl_s, *metas], client=pipe)
        groups = Counter((int(spec.priority), spec.tenant, spec.provider, spec.model,
                          res.state.value, res.missed_deadline)
                         for res, spec in zip(results, specs, strict=True))
        fields: Counter[str] = Counter()
        per_class: Counter[str] = Counter()
        for (cls, tenant, provider, model, state, missed), n in groups.items():
            rest = f"{cls}|{stats.label(tenant, provider, model)}"
            fields[f"s|{rest}"] += n
            fields[f"f|{state}|{rest}"] += n
            fields[f"c|{kind}|{rest}"] += n
            if missed:
                fields[f"m|{rest}"] += n
            per_class[f"s|{cls}"] += n
            per_class[f"f|{state}|{cls}"] += n
        for name, n in fields.items():
            pipe.hincrby(keys.STATS, name, n)
        recent = keys.recent(stats.bucket_of(time.time()))
        for name, n in per_class.items():
            pipe.hincrby(recent, name, n)
        pipe.expire(recent, stats.BUCKET_TTL_S)
        pipe.execute()

    def cache_get(self, cache_keys: Sequence[str]) -> list[str | None]:
        """Cached entries (JSON) of exact keys."""
        if not cache_keys:
            return []
        return list(self.r.mget([keys.cache_entry(k) for k in cache_keys]))  # type: ignore[arg-type]

    def cache_put(self, key: str, partition: str, entry: str, *, ttl_s: int, now: float,
                  max_entries: int, max_bytes: int) -> None:
        """Store an entry, keeping its partition within its bounds."""
        evicted = self._cache_put(keys=[keys.cache_entry(key), keys.cache_index(partition),
                                        keys.cache_sizes(partition), keys.cache_bytes(partition),
                                        keys.CACHE_PARTITIONS],
                                  args=[entry, ttl_s, now, max_entries, max_bytes, partition])
        if evicted:  # out of the partition's accounts already; each also expires on its own
            self.r.delete(*evicted)

    def coalesce(self, specs: Sequence[JobSpec], cache_keys: Sequence[str],
                 ttl_s: int) -> list[str]:
        """For staged jobs with these cache keys: per job the id of the job it waits for
        (its own when it leads)."""
        recent = keys.recent(stats.bucket_of(time.time()))
        pipe = self.r.pipeline(transaction=False)
        for spec, key in zip(specs, cache_keys, strict=True):
            self._coalesce(keys=[keys.cache_lead(key), keys.cache_followers(key),
                                 keys.job(spec.id), keys.STATS, recent],
                           args=[spec.id, ttl_s, stats.BUCKET_TTL_S, int(spec.priority),
                                 stats.label(spec.tenant, spec.provider, spec.model), key],
                           client=pipe)
        return [str(x) for x in pipe.execute()]

    def take_followers(self, leader: str, key: str) -> list[str]:
        """The jobs waiting for ``leader`` (which is final); it leads no more."""
        return [str(x) for x in self._take_followers(
            keys=[keys.cache_lead(key), keys.cache_followers(key)], args=[leader])]

    def release_followers(self, job_ids: Sequence[str]) -> list[str]:
        """Followers whose leader failed: published to run on their own; returns them."""
        if not job_ids:
            return []
        flags = self._release_followers(keys=[keys.job(j) for j in job_ids])
        freed = [j for j, f in zip(job_ids, flags, strict=True) if int(f)]
        self.publish(freed)
        return freed

    def release_orphan_followers(self, job_ids: Sequence[str]) -> list[str]:
        """Followers whose leader will never hand them over: it is final (its worker died
        before handing over, or it finished without its result reaching Redis), withdrawn,
        gone (its payload expired), or no longer leads their key. They run on their own.
        Returns them."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), "lead", "key")
        leads = pipe.execute()
        for lead, key in leads:
            pipe.exists(keys.celery_result(lead or "-"))
            pipe.get(keys.cache_lead(key or "-"))
            pipe.hget(keys.job(lead or "-"), "state")
        checks = pipe.execute()
        orphans = [j for i, (j, (lead, _)) in enumerate(zip(job_ids, leads, strict=True))
                   if lead is None or checks[3 * i] or checks[3 * i + 1] != lead
                   or checks[3 * i + 2] not in _LEADING_STATES]
        return self.release_followers(orphans)

    def cache_purge(self, partitions: str, digests: str = "*") -> int:
        """Delete the entries of the partitions that match the glob ``partitions`` whose
        hash matches ``digests``, and the accounts of partitions left empty; return how many
        entries went. The partitions come from their registry and the entries from each
        partition's index: no keyspace scan. (Their semantic vectors stay until they
        leave the semantic index: a lookup passes over a vector whose entry is gone.)"""
        gone = 0
        prefix = keys.cache_entry("")
        for part in self.r.zrange(keys.CACHE_PARTITIONS, 0, -1):
            part = str(part)
            if not fnmatch.fnmatchcase(part, partitions):
                continue
            names = [str(n) for n in self.r.zrange(keys.cache_index(part), 0, -1)]
            chosen = [n for n in names
                      if fnmatch.fnmatchcase(n[len(prefix):].rpartition(":")[2], digests)]
            for start in range(0, len(chosen), 500):
                gone += self._purge_batch(part, chosen[start:start + 500])
            if len(chosen) == len(names):
                pipe = self.r.pipeline(transaction=True)
                pipe.delete(keys.cache_index(part), keys.cache_sizes(part),
                            keys.cache_bytes(part))
                pipe.zrem(keys.CACHE_PARTITIONS, part)
                pipe.execute()
        return gone

    def _purge_batch(self, part: str, names: list[str]) -> int:
        sizes: list[Any] = list(self.r.hmget(keys.cache_sizes(part), names))
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(*names)
        pipe.zrem(keys.cache_index(part), *names)
        pipe.hdel(keys.cache_sizes(part), *names)
        total = sum(int(x) for x in sizes if x)
        if total:
            pipe.decrby(keys.cache_bytes(part), total)
        return int(pipe.execute()[0])  # entries that still existed (not yet expired)

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

    def have_results(self, job_ids: Sequence[str]) -> list[bool]:
        """Whether the result backend holds each job's result."""
        have = [True] * len(job_ids)
        for start in range(0, len(job_ids), 1000):  # one Lua step per 1,000
            part = job_ids[start:start + 1000]
            for i in self._missing(keys=[keys.celery_result(j) for j in part]):
                have[start + int(i) - 1] = False
        return have

    def states(self, job_ids: Sequence[str]) -> list[str | None]:
        """The Redis-side state of each job (None when Redis does not hold it)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "state")
        return list(pipe.execute())

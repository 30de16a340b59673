"""The scheduler service: the thin loop around the pure policy.

One scheduler is active at a time: it holds a lease in Redis (a short TTL, renewed once a
third of it has passed, checked every tick and between the steps of long work) and the
steps that change what it owns (claim, expire, requeue) are fenced by it, so a scheduler
that lost its lease cannot send anything. Standbys poll until the lease is free.

Each tick: read new intake entries and events (blocking briefly, so a new job or a
finished batch wakes the loop at once) into the backlog, admit from it as many jobs as
the pool has room for (``max_pool_jobs``; highest class first, tenants in turn), embed
them in one vectorised call, promote aged jobs, ask ``plan`` what to send, expire what
must be expired, and send each batch as one Celery task. Then a slice of the
reconciler's pass and of retention's deletes runs. Every step is bounded
(``scheduler_read_count`` entries, one page of the reconciler), so no amount of work
waiting costs the scheduler its lease. A batch is claimed in Redis before it is sent
(``jobs/lua/claim.lua``: its jobs SCHEDULED and out of intake, the batch in the outbox
and in flight) and leaves the outbox when a send of it starts on a worker
(``jobs/lua/start_run.lua``). Workers run a batch once per claim, whichever send arrives
first, so a batch sent twice still runs once.

A scheduler that becomes active (at start, or taking over) re-sends the outbox, so a
batch whose send was lost with its scheduler is sent again, and then reads intake from
its start through the same ticks: it sends its first batch after one tick, however long
the backlog, and continues the reconciler's pass where the previous scheduler left it.
It does the same when it finds itself talking to another Redis server (a Sentinel
failover or a restart: the new one may lack the old one's last writes, a send or a
claim among them), and starts a reconciler pass at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import faiss
import redis
from celery import Celery

from config import keys
from config.celery import PROCESS_BATCH, batch_repr, build_celery
from config.settings import PRIORITY_NAMES, Settings
from jobs import cache, gcpause
from jobs.models import IntakeEntry, JobResult, JobSpec, JobState
from jobs.outcomes import record_results
from jobs.prices import PriceBook, warn_at_start
from jobs.queue import Reading, RedisQueue, connect
from jobs.readiness import wait_until_ready
from jobs.retention import Retention
from jobs.stats import class_name, read_recent, read_totals
from jobs.store import JobStore
from jobs.validation import PROVIDER_DEFAULT_MODELS
from scheduler.backlog import Backlog
from scheduler.embedders import Embedder, create_embedder
from scheduler.lane_desk import LaneDesk
from scheduler.metrics import SchedulerMetrics
from scheduler.monitor import Monitor
from scheduler.policy import SHARED_FROM, Capacity, PlannedBatch, plan
from scheduler.pool import PendingJob, Pool, estimate_job_tokens, prefix_signature
from scheduler.reconcile import LeaseLost, Reconciler
from scheduler.routing import Routing
from scheduler.scaling import (
    ClassDemand,
    class_deadlines,
    deadline_risks,
    desired_slots,
    rate_cap,
)
from scheduler.semantic import SemanticCache
from scheduler.service_time import ServiceModel, deployment

log = logging.getLogger(__name__)

#: How long a worker heartbeat counts, in seconds.
WORKER_STALE_S = 15.0
#: How often aged jobs are promoted, in seconds.
PROMOTE_EVERY_S = 0.5
#: How often the active scheduler logs its state, in seconds.
REPORT_EVERY_S = 10.0
#: How often the scheduler collects its garbage in full and gives freed memory back to
#: the system, in seconds (``gcpause.collect_and_release``).
TRIM_EVERY_S = 30.0
#: Time the reconciler may take per tick while a pass is under way, in seconds.
RECONCILE_SLICE_S = 0.02
#: How often the active scheduler refreshes the overview (metrics, ``promptbatch status``).
OVERVIEW_EVERY_S = 1.0
#: How long the overview it writes to Redis stays valid, in seconds.
OVERVIEW_TTL_S = 15


class Scheduler:
    """The scheduler loop. ``run()`` blocks until ``stop()``."""

    def __init__(self, settings: Settings, *, redis_url: str | None = None,
                 embedder: Embedder | None = None, celery_app: Celery | None = None) -> None:
        self.settings = settings
        faiss.omp_set_num_threads(settings.faiss_threads)
        self.url = redis_url or settings.redis_url
        if not self.url:
            raise ValueError("redis_url is empty: set PROMPTBATCH_REDIS_URL")
        self.r = connect(self.url)
        self.queue = RedisQueue(self.r)
        self.store = JobStore.for_settings(settings)
        self.embedder = embedder or create_embedder(settings.embedder, dim=settings.embedding_dim)
        self.celery = celery_app or build_celery(settings, "promptbatch-scheduler", self.url)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pool = self._new_pool()
        self.backlog = Backlog(aging_s=settings.aging_s)
        #: Prices of the answers the semantic cache gives (what they saved), and of the
        #: results the reconciler writes back (their savings by reason).
        self.prices = PriceBook.for_settings(settings)
        warn_at_start(self.prices, settings, PROVIDER_DEFAULT_MODELS)
        self.reconciler = Reconciler(self.store, self.queue, settings, self.token, self.prices)
        self.retention = Retention(self.store, settings.retention_days,
                                   settings.retention_interval_s)
        self.service = ServiceModel()
        self.active = False
        self.last_sid = "0-0"
        self.last_event = "$"
        self._stop = threading.Event()
        self._last_promote = 0.0
        self._renewed = 0.0
        self._caught_up = False
        self.sent_batches = 0
        self.sent_jobs = 0
        self.first_sent_at: float | None = None
        self._last_report = 0.0
        self._last_trim = time.monotonic()
        self._last_capacity = Capacity(slots=0)
        self.metrics = SchedulerMetrics(settings.metrics_tenant_label)
        self.semantic = SemanticCache(self.r, settings, self.embedder)
        self._last_overview = 0.0
        #: The Redis server this scheduler talks to (its ``run_id``): another one after a
        #: failover or a restart, which may have lost the last writes (``_hold_lease``).
        self._server = ""
        #: Deployments with replicas: where each batch goes (``scheduler.routing``).
        self.routing = Routing(settings)
        #: The half-price lane: jobs for providers' batch endpoints (``scheduler.lane_desk``).
        self.lane = LaneDesk(settings, self.queue, self.store, self.celery, self.token,
                             self._renew)
        #: Baselines and anomalies, and what they change (``scheduler.monitor``).
        self.monitor = Monitor(self.r, settings, self.routing, self.metrics.anomalies)

    def _new_pool(self) -> Pool:
        horizons = tuple(max(self.settings.max_wait_s(c), 0.001) * 10 + c * 60.0
                         for c in range(5))
        return Pool(dim=self.embedder.dim, horizons=horizons, aging_s=self.settings.aging_s)

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its tick and return."""
        self._stop.set()

    def run(self) -> None:
        """Wait for Redis and SQL, then schedule until stopped; release the lease on exit."""
        self._wait_for_services()
        self._prepare_sending()
        log.info("scheduler %s started (embedder %s, dim %d)", self.token,
                 self.settings.embedder, self.embedder.dim)
        try:
            while not self._stop.is_set():
                try:
                    if not self._hold_lease():
                        self._stop.wait(min(1.0, self.settings.lease_ttl_s / 3))
                        continue
                    self.tick()
                    self._reconcile_slice()
                    self._retention_slice()
                    self._report()
                    self._refresh_overview()
                except LeaseLost:
                    log.warning("scheduler %s lost its lease; standing by", self.token)
                    self._step_down()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("Redis unavailable (%s); retrying in 1 s", exc)
                    self._step_down()
                    self._stop.wait(1.0)
                except Exception:
                    # Never die with jobs pending: drop the in-memory state and rebuild it
                    # from Redis (intake and outbox are the truth), after a pause.
                    log.exception("scheduler tick failed; rebuilding from Redis in 1 s")
                    self._step_down()
                    self._stop.wait(1.0)
        finally:
            if self.active:
                with contextlib.suppress(redis.RedisError):
                    self.queue.release_lease(self.token)
            self.store.close()

    def _reconcile_slice(self) -> None:
        """A bounded slice of the reconciler's pass (one page or ~20 ms)."""
        now = time.time()
        if self.reconciler.due(now):
            self.reconciler.step(now, RECONCILE_SLICE_S)
            self._renew()

    def _retention_slice(self) -> None:
        """A bounded slice of retention's deletes (a page of each table, or ~20 ms)."""
        now = time.time()
        if self.retention.due(now):
            self.retention.step(now, RECONCILE_SLICE_S)
            self._renew()

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_report < REPORT_EVERY_S:
            return
        self._last_report = now
        if now - self._last_trim >= TRIM_EVERY_S:
            self._last_trim = now
            took = gcpause.collect_and_release()
            if took > 0.2:
                log.info("a full garbage collection took %.0f ms", took * 1000)
        cap = self._last_capacity
        log.info("pool %d pending in %d groups, %d more waiting in the backlog; sent %d jobs "
                 "in %d batches; workers %d slots, %d batches in flight", len(self.pool),
                 len(self.pool.groups), len(self.backlog), self.sent_jobs, self.sent_batches,
                 cap.slots, cap.inflight)

    def _wait_for_services(self) -> None:
        """Wait for Redis and the store; ``SchemaBehind`` or ``StoreMismatch`` go up."""
        wait_until_ready(self.queue, self.store, self.url, self._stop)

    def _prepare_sending(self) -> None:
        """Set the Celery app up and connect its producer, which Celery otherwise does in
        the first ``send_task`` (~50-100 ms of imports and configuration, before the first
        batch could leave)."""
        self.celery.finalize()
        _ = self.celery.amqp.router
        with contextlib.suppress(Exception), self.celery.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)  # else: at the first send

    def _hold_lease(self) -> bool:
        """Take the lease (standby), or renew it once a third of its time-to-live has
        passed (active: a round trip per tick would cost more than the tick's own reads;
        every claim checks the lease anyway)."""
        if self.active and time.monotonic() - self._renewed < self.settings.lease_ttl_s / 3:
            return True
        held = self.queue.acquire_lease(self.token, self.settings.lease_ttl_s)
        server = ""
        if held:
            self._renewed = time.monotonic()
            server = self.queue.server_id()
        if held and not self.active:
            log.info("scheduler %s is active", self.token)
            self.active = True
            self.metrics.active.set(1)
            self._server = server
            self._recover()
        elif held and server != self._server:
            # A failover (or a restart) in between: the server now answering may lack the
            # last writes of the one before (replication and AOF are asynchronous), such as
            # a batch's send or a claim. Recover as a new scheduler would.
            log.warning("Redis is another server now (a failover or a restart): re-sending "
                        "the batches not started and reading intake again")
            self._server = server
            self._recover()
            self.reconciler.start_soon()
        elif not held and self.active:
            log.warning("scheduler %s lost its lease; standing by", self.token)
            self._step_down()
        return held

    def _renew(self) -> None:
        """Renew the lease if a third of its time-to-live has passed since the last
        renewal (called between the steps of long work); ``LeaseLost`` if it is gone."""
        now = time.monotonic()
        if now - self._renewed < self.settings.lease_ttl_s / 3:
            return
        if not self.queue.acquire_lease(self.token, self.settings.lease_ttl_s):
            raise LeaseLost
        self._renewed = now

    def _step_down(self) -> None:
        self.active = False
        self.metrics.active.set(0)
        self.metrics.cluster.update(None, [])
        self.metrics.money.standby()
        self.monitor.step_down()
        self.pool = self._new_pool()
        self.backlog = Backlog(aging_s=self.settings.aging_s)
        self.lane.reset()
        self.last_sid = "0-0"
        self._caught_up = False

    def _recover(self) -> None:
        """On becoming active, or finding another Redis server: re-send the outbox (the
        batches claimed and not started: a send may have been lost with a scheduler or a
        Redis; a second send does not run), then read intake from its start (in the ticks
        that follow, a bounded number of entries each) and continue the reconciler's pass
        where it was."""
        self.last_event = self.queue.last_event_id()
        outbox = self.queue.outbox()
        flying = self.queue.in_flight(sorted(outbox))
        self.queue.drop_from_outbox([b for b in outbox if b not in flying])  # taken for lost
        for batch_id, (meta, job_ids) in outbox.items():
            if batch_id not in flying:
                continue
            info = json.loads(meta)
            log.info("re-sending batch %s (%d jobs), not started", batch_id, len(job_ids))
            self._send(batch_id, job_ids, int(info["cls"]), info.get("similarity"),
                       int(info.get("prefix", 0)), float(info.get("estimate", 0.0)),
                       info.get("deployment", ""))  # any replica: the worker picks
            self._renew()
        self.pool = self._new_pool()
        self.backlog = Backlog(aging_s=self.settings.aging_s)
        self.lane.reset()
        self.last_sid = "0-0"
        self._caught_up = False
        self.reconciler.resume()
        self.monitor.load(time.time())
        if self.settings.cache_enabled and self.settings.cache_semantic_tenants:
            log.info("semantic cache: %d vectors loaded", self.semantic.load(self._renew))
        log.info("recovered: re-sent %d batches from the outbox; reading %d intake entries",
                 len(flying), self.queue.r.xlen(keys.INTAKE))

    # --- one tick -----------------------------------------------------------------------

    def tick(self) -> None:
        """Read, admit, plan, send. Blocks at most ``scheduler_tick_ms`` waiting for news,
        and not at all while intake or the backlog has more to take in."""
        room = self.settings.max_pool_jobs - len(self.pool) - len(self.lane)
        busy = not self._caught_up or (room > 0 and len(self.backlog) > 0)
        block = None if busy else int(self.settings.scheduler_tick_ms)
        count = self.settings.scheduler_read_count
        now = time.time()
        # The read and the capacity: one round trip.
        reading = self.queue.read_intake(
            self.last_sid, count, block, self.last_event,
            stale_before=now - self.settings.visibility_timeout_s - self.settings.task_time_limit_s)
        entries, events = reading.entries, reading.events
        if entries:
            self.backlog.add(entries)
            self.last_sid = entries[-1].sid
        self._caught_up = len(entries) < count
        if events:
            self._on_events(events)
            self.last_event = events[-1][0]
        now = time.time()
        self._take_in(now)
        self._lane_tick(now)
        if now - self._last_promote >= PROMOTE_EVERY_S:
            self.pool.promote(now)
            self._last_promote = now
        if not len(self.pool):
            return
        self._renew()
        self._last_capacity = self._capacity(reading, now)
        started = time.perf_counter()
        decided = plan(self.pool, now, self.settings, self._last_capacity, self.service)
        self.metrics.plan_seconds.observe(time.perf_counter() - started)
        if decided.expired:
            self._expire(decided.expired, now)
        for batch in decided.batches:
            if not self.active:
                break
            self._dispatch(batch)
            self._renew()
        self.pool.charge(decided.charges)

    def _take_in(self, now: float) -> None:
        """Expire what waited past its deadline in the backlog; admit what fits the pool."""
        late = self.backlog.expired(now)
        if late:
            self._expire_jobs([(e.job_id, e.tenant) for e in late], now,
                              "deadline passed before the job could be scheduled")
        room = self.settings.max_pool_jobs - len(self.pool) - len(self.lane)
        if room > 0 and len(self.backlog):
            self._admit(self.backlog.take(min(room, self.settings.scheduler_read_count), now))

    def _admit(self, entries: Sequence[IntakeEntry]) -> None:
        """Load, embed and pool the jobs still QUEUED (cancelled or sent ones are dropped)."""
        fresh = [e for e in entries if e.job_id not in self.pool]
        if not fresh:
            return
        loaded = self.queue.load([e.job_id for e in fresh])
        specs: list[JobSpec] = [spec for spec, state in loaded
                                if spec is not None and state == JobState.QUEUED]
        if self.settings.cache_enabled and self.settings.cache_semantic_tenants:
            specs = self._semantic_hits(specs)
        specs = self.lane.admit(specs, time.time())  # the rest wait for a provider batch
        if not specs:
            return
        texts = [s.text for s in specs]
        vectors = self.embedder.embed(texts)
        jobs = [PendingJob(id=s.id, key=s.compat_key, priority=int(s.priority), tenant=s.tenant,
                           created_at=s.created_at, deadline=s.deadline,
                           tokens=estimate_job_tokens(s, t), prefix=prefix_signature(t))
                for s, t in zip(specs, texts, strict=True)]
        self.pool.add(jobs, vectors)

    def _semantic_hits(self, specs: list[JobSpec]) -> list[JobSpec]:
        """Answer the jobs the semantic cache can; return the others."""
        found = self.semantic.lookup(specs)
        m = self.metrics
        for best in found.best:
            m.semantic_best.observe(best)
        m.semantic.labels("hit").inc(len(found.hits))
        m.semantic.labels("guarded").inc(found.guarded)
        m.semantic.labels("miss").inc(len(found.best) - len(found.hits) - found.guarded)
        if not found.hits:
            return specs
        now = time.time()
        answered = [s for s in specs if s.id in found.hits]
        results = [cache.hit_result(s, found.hits[s.id].entry, now,
                                    round(found.hits[s.id].similarity, 4), prices=self.prices)
                   for s in answered]
        record_results(self.store, self.queue, results, [s.tenant for s in answered],
                       result_ttl_s=self.settings.result_ttl_s,
                       classes=[int(s.priority) for s in answered], hit="semantic",
                       prices=self.prices)
        return [s for s in specs if s.id not in found.hits]

    def _on_events(self, events: Sequence[tuple[str, dict[str, str]]]) -> None:
        cancelled = [f["cancel"] for _, f in events if "cancel" in f]
        if cancelled:
            self.pool.remove(cancelled)
            self.lane.remove(cancelled)
            self.lane.on_cancelled(cancelled)
        for _, f in events:
            if "done" not in f:
                continue
            # A batch's end: with the timing of its provider call, or (``ended``) without
            # one, when it ran nothing, was split as poison or raised.
            seconds = float(f["seconds"]) if "seconds" in f else None
            if seconds is not None and "deployment" in f:
                self.service.observe(f["deployment"], int(f["size"]), seconds)
                self.monitor.on_event(f, time.time())
            self.routing.done(f["done"], seconds,
                              int(f["replica"]) if "replica" in f else None)

    def _lane_tick(self, now: float) -> None:
        """Send the provider batches due, and the tasks of the open ones due
        (``scheduler.lane_desk``)."""
        full = (len(self.backlog) > 0
                and len(self.pool) + len(self.lane) >= self.settings.max_pool_jobs)
        if len(self.lane):
            self.sent_jobs += self.lane.tick(now, full)
        self.lane.sweep(now)

    def _capacity(self, reading: Reading, now: float) -> Capacity:
        inflight = reading.inflight
        shared = sum(1 for member in inflight if int(member.split(":", 1)[0]) >= SHARED_FROM)
        slots = 0
        for raw in reading.workers.values():
            info = json.loads(raw)
            if now - float(info["ts"]) <= WORKER_STALE_S:
                slots += int(info["concurrency"])
        return Capacity(slots=slots, inflight=len(inflight), queued=tuple(reading.queued),
                        shared=shared)

    def _expire(self, jobs: Sequence[PendingJob], now: float) -> None:
        self.pool.remove([j.id for j in jobs])
        self._expire_jobs([(j.id, j.tenant) for j in jobs], now,
                          "deadline passed (or too close to meet) before the job could run")

    def _expire_jobs(self, jobs: Sequence[tuple[str, str]], now: float, why: str) -> None:
        """End ``(id, tenant)`` jobs EXPIRED: taken out of intake under the lease
        first (a paused former scheduler must not expire what its successor sent;
        ``LeaseLost`` then), with their deployment as their result's, so the counters of
        each deployment balance."""
        taken = self.queue.take_to_expire(self.token, jobs)
        if taken is None:
            raise LeaseLost
        if not taken:
            return
        specs = [spec for spec, _ in self.queue.load(taken) if spec is not None]
        results = [JobResult(id=s.id, state=JobState.EXPIRED, created_at=s.created_at,
                             finished_at=now, deadline=s.deadline, provider=s.provider,
                             model=s.model, error=why) for s in specs]
        # Counted under the class each was submitted in (not the one aging promoted it to).
        record_results(self.store, self.queue, results, [s.tenant for s in specs],
                       result_ttl_s=self.settings.result_ttl_s,
                       classes=[int(s.priority) for s in specs])
        for s in specs:
            self.metrics.expired.labels(class_name(str(int(s.priority)))).inc()

    def _dispatch(self, batch: PlannedBatch) -> None:
        batch_id = str(uuid.uuid4())
        dep = deployment(batch.jobs[0].key)
        meta = json.dumps({"cls": batch.cls, "similarity": batch.similarity,
                           "reason": batch.reason, "prefix": batch.pending_prefix_chars,
                           "estimate": batch.estimate_s, "deployment": dep})
        claimed = self.queue.claim(self.token, batch_id, meta,
                                   [(j.id, j.tenant) for j in batch.jobs], time.time(),
                                   batch.cls)
        if claimed is None:
            log.warning("lease lost while claiming batch %s; standing by", batch_id)
            self._step_down()
            return
        self.pool.remove([j.id for j in batch.jobs])
        if claimed:
            order = self.routing.route(
                batch_id, batch.jobs, batch.shared_prefix_chars,
                batch.estimate_s or self.service.estimate(batch.key, len(batch.jobs)), dep,
                time.time())
            self._send(batch_id, claimed, batch.cls, batch.similarity,
                       batch.pending_prefix_chars, batch.estimate_s, dep, order)
            self._observe_batch(batch, len(claimed))

    def _observe_batch(self, batch: PlannedBatch, size: int) -> None:
        m = self.metrics
        provider, model = deployment(batch.jobs[0].key).split("|", 1)
        m.batches_sent.labels(class_name(str(batch.cls)), provider, model).inc()
        m.batch_size.labels(provider, model).observe(size)
        if batch.similarity is not None:
            m.similarity.labels(provider, model).observe(batch.similarity)
        now = time.time()
        for j in batch.jobs:
            if j.deadline is not None:
                m.slack.labels(class_name(str(j.priority))).observe(max(0.0, j.deadline - now))

    def _send(self, batch_id: str, job_ids: list[str], cls: int,
              similarity: float | None, prefix_hint: int = 0,
              estimate_s: float = 0.0, dep: str = "",
              replicas: list[int] | None = None) -> None:
        if self.first_sent_at is None:
            self.first_sent_at = time.time()
            log.info("first batch sent")
        self.celery.send_task(
            PROCESS_BATCH,
            kwargs={"batch_id": batch_id, "send_id": uuid.uuid4().hex, "job_ids": job_ids,
                    "similarity": similarity, "cls": cls, "prefix_hint": prefix_hint,
                    "estimate_s": round(estimate_s, 4),
                    **({"replicas": replicas} if replicas else {})},
            task_id=batch_id,
            queue=keys.queue(cls),
            routing_key=keys.queue(cls),
            argsrepr="()",
            kwargsrepr=batch_repr(cls, job_ids, dep, similarity),
            # The task stores no result of its own (each job's is stored): without this,
            # Celery's Redis backend subscribes to the task's result channel on every send.
            ignore_result=True,
        )
        # In the outbox until a send of it starts (``start_run``): a scheduler that takes
        # over, or finds another Redis, sends it again; a second send does not run.
        self.sent_batches += 1
        self.sent_jobs += len(job_ids)

    # --- the overview (metrics, ``promptbatch status``) ---------------------------------

    def _refresh_overview(self) -> None:
        """Every second while active: compute the overview, write it to Redis for
        ``promptbatch status`` and hand it to the metrics."""
        now = time.monotonic()
        if not self.active or now - self._last_overview < OVERVIEW_EVERY_S:
            return
        self._last_overview = now
        at = time.time()
        overview = self.overview(at)
        # The router learns which replicas cool down from the overview's read of them.
        self.routing.cooling = set(overview["cooling"])
        self.routing.forget_before(at - self.settings.visibility_timeout_s)
        totals = read_totals(self.r)
        self.monitor.on_totals(totals, at)
        self.monitor.step(at)
        overview["anomalies"] = self.monitor.snapshot()
        overview["anomaly_detection"] = self.monitor.enabled
        overview["anomaly_actions_off"] = sorted(self.monitor.off)
        overview["replicas"] = self.routing.snapshot()
        self.metrics.money.refresh(self.r, self.store.engine, at)
        overview["spend_today"] = self.metrics.money.today()
        overview["lanes"] = self.lane.overview(at)
        self.r.set(keys.OVERVIEW, json.dumps(overview), ex=OVERVIEW_TTL_S)
        self.metrics.pool_jobs.set(len(self.pool))
        self.metrics.backlog_jobs.set(len(self.backlog))
        self.metrics.cluster.update(overview, totals)
        self.metrics.replicas(overview["replicas"])

    def overview(self, now: float) -> dict[str, Any]:
        """Pending work per class, workers, in flight, the scaling signal, cooling
        deployments: what an operator looks at first."""
        n_cls = len(PRIORITY_NAMES)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(keys.WORKERS)
        pipe.zrange(keys.INFLIGHT, 0, -1)
        pipe.zremrangebyscore(keys.COOLING, "-inf", now)
        pipe.zrange(keys.COOLING, 0, -1)
        for name in keys.QUEUES:
            pipe.llen(name)
        workers_raw, inflight_raw, _, cooling_raw, *queued = pipe.execute()
        cooling = sorted(str(k) for k in cooling_raw)
        workers = slots = 0
        for raw in workers_raw.values():
            info = json.loads(raw)
            if now - float(info["ts"]) <= WORKER_STALE_S:
                workers += 1
                slots += int(info["concurrency"])
        inflight = [0] * n_cls
        for member in inflight_raw:
            cls = int(str(member).split(":", 1)[0])
            if 0 <= cls < n_cls:
                inflight[cls] += 1
        # Pending work in the pool, per class, at the learned service times.
        pool_n = [0] * n_cls
        oldest: list[float | None] = [self.backlog.oldest(c) for c in range(n_cls)]
        slack: list[float | None] = [None] * n_cls
        work = [0.0] * n_cls
        batches = [0] * n_cls
        per_job: dict[str, tuple[float, int]] = {}
        with_deadlines: list[tuple[int, Any, float]] = []
        max_size = self.settings.max_batch_size
        for group in list(self.pool.groups.values()):
            n = len(group)
            if not n:
                continue
            c = group.cls
            pool_n[c] += n
            first = min(j.created_at for j in group.jobs.values())
            oldest[c] = first if oldest[c] is None else min(oldest[c] or first, first)
            if group.by_deadline:
                left = group.by_deadline[0][0] - now
                slack[c] = left if slack[c] is None else min(slack[c] or left, left)
            size = min(n, max_size)
            seconds = self.service.line(group.key).at(size)
            nb = -(-n // size)
            work[c] += nb * seconds
            batches[c] += nb
            if group.by_deadline:
                with_deadlines.append((c, group.by_deadline, seconds / size))
            dep = deployment(group.key)
            total, count = per_job.get(dep, (0.0, 0))
            per_job[dep] = (total + nb * seconds, count + n)
        pooled = sum(pool_n)
        mean_job_s = (sum(work) / pooled if pooled
                      else self.service.prior.at(max_size) / max_size)
        batch_s = (sum(work) / sum(batches) if sum(batches)
                   else self.service.prior.at(max_size))
        recent = read_recent(self.r, now, 60)
        backlog_n = self.backlog.counts()
        demands = []
        rows = []
        for c in range(n_cls):
            name = PRIORITY_NAMES[c]
            waiting = backlog_n[c]
            demands.append(ClassDemand(
                pending=pool_n[c] + waiting,
                work_s=work[c] + waiting * mean_job_s,
                batches=batches[c] + -(-waiting // max_size),
                inflight=inflight[c], slack_s=slack[c],
                arriving_s=recent.submitted.get(name, 0) / recent.window_s * mean_job_s))
            first_at, left = oldest[c], slack[c]
            rows.append({"class": name, "pending": pool_n[c] + waiting, "pool": pool_n[c],
                         "backlog": waiting,
                         "oldest_wait_s": 0.0 if first_at is None
                         else round(max(0.0, now - first_at), 3),
                         "slack_s": None if left is None else round(left, 3),
                         "inflight": inflight[c], "queued": int(queued[c])})
        cap = rate_cap({d: t / n for d, (t, n) in per_job.items()}, self.settings.rate_limits)
        scale = desired_slots(demands, horizon_s=self.settings.scale_horizon_s,
                              batch_s=batch_s, cap=cap)
        # Deadline pressure per class (``deadline_risk``), and its action on the signal.
        risks = deadline_risks([d.work_s for d in demands],
                               class_deadlines(with_deadlines, now, n_cls), slots=slots,
                               batch_s=batch_s, inflight=sum(inflight), keep_up=scale.keep_up)
        self.monitor.on_deadlines(risks, now)
        desired, reason = self.monitor.desired(scale.desired, scale.reason, risks, cap,
                                               scale.keep_up)
        return {"at": now, "scheduler": self.token, "classes": rows, "workers": workers,
                "slots": slots, "inflight": sum(inflight),
                "desired_slots": desired, "scale_reason": reason,
                "batch_seconds": round(batch_s, 4), "cooling": cooling,
                "catching_up": not self._caught_up, "sent_batches": self.sent_batches,
                "sent_jobs": self.sent_jobs}

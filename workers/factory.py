"""The Celery app of the workers, built from settings, with the batch task registered."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from sqlalchemy.exc import SQLAlchemyError

from config import keys
from config.celery import LANE_POLL, LANE_SUBMIT, PROCESS_BATCH, batch_repr, build_celery
from config.settings import Settings
from jobs import gcpause
from jobs.prices import PriceBook, warn_at_start
from jobs.queue import RedisQueue, connect
from jobs.stats import class_name
from jobs.store import JobStore
from jobs.streams import Sink
from jobs.validation import PROVIDER_DEFAULT_MODELS
from workers.batch import BatchRunner
from workers.lane import LaneRunner, batch_client
from workers.providers import Provider, create_provider
from workers.providers.batch_api import BatchClient

log = logging.getLogger(__name__)

#: Seconds between worker heartbeats in ``pb:workers`` (the scheduler's capacity view).
HEARTBEAT_S = 2.0


class JobsFailed(Exception):
    """Raised by a batch's task, once every result is stored, when some of its jobs
    failed: Celery then records the task as failed (Flower shows it red, with the counts,
    and lists it under Failed). Its message is acknowledged as on success; nothing runs
    again."""

    def __init__(self, summary: dict[str, Any]) -> None:
        counts = ", ".join(f"{k} {summary[k]}" for k in ("succeeded", "expired", "skipped")
                           if summary.get(k))
        timed = " (the task's time limit)" if summary.get("timed_out") else ""
        super().__init__(f"{summary.get('failed')} of {summary.get('size')} jobs failed"
                         f"{timed}" + (f"; {counts}" if counts else ""))
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its summary across the pool
        return (JobsFailed, (self.summary,))


class _ProcessResources:
    """Connections and providers of one worker process, created after the fork (at the
    process's start, so that its first batch does not wait for them)."""

    def __init__(self, settings: Settings, url: str,
                 resend: Callable[[str, str, str, int], None]) -> None:
        self.settings = settings
        self.url = url
        self.resend = resend
        self.pid = -1
        self._runner: BatchRunner | None = None
        self._lane: LaneRunner | None = None
        self._providers: dict[str, Provider] = {}
        #: Made before the fork (the worker's start warns about unpriced deployments
        #: once; its pool processes inherit what it looked up and warned about).
        self.prices = PriceBook.for_settings(settings)
        self._batch_clients: dict[str, BatchClient] = {}

    def runner(self) -> BatchRunner:
        if self._runner is None or self.pid != os.getpid():
            self.pid = os.getpid()
            self._providers = {}
            # Both connect lazily: a store or Redis that is down does not stop the start.
            self._runner = BatchRunner(self.settings, RedisQueue(connect(self.url)),
                                       JobStore.for_settings(self.settings), self.provider,
                                       resend=self.resend, prices=self.prices)
        return self._runner

    def lane(self) -> LaneRunner:
        """The runner of the provider batches' tasks (the batch runner's connections)."""
        runner = self.runner()
        if self._lane is None or self._lane.queue is not runner.queue:
            self._batch_clients = {}
            self._lane = LaneRunner(self.settings, runner.queue, runner.store,
                                    self.batch_client, prices=self.prices)
        return self._lane

    def batch_client(self, name: str) -> BatchClient:
        if name not in self._batch_clients:
            self._batch_clients[name] = batch_client(name, self.settings)
        return self._batch_clients[name]

    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            provider = create_provider(name, self.settings)
            if provider.streams:  # chunks go to the jobs' streams
                provider.sink = Sink(connect(self.url), self.settings.result_ttl_s)
            self._providers[name] = provider
        return self._providers[name]


class _Heartbeat:
    """Writes this worker's pool size to ``pb:workers`` every few seconds."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.hostname = ""

    def start(self, hostname: str, concurrency: int) -> None:
        self.hostname = hostname
        r = connect(self.url)

        def beat() -> None:
            while not self.stop.is_set():
                try:
                    r.hset(keys.WORKERS, hostname, json.dumps(
                        {"concurrency": concurrency, "ts": time.time(), "pid": os.getpid()}))
                except redis.RedisError as exc:
                    log.warning("heartbeat to Redis failed: %s", exc)
                self.stop.wait(HEARTBEAT_S)
            with contextlib.suppress(redis.RedisError):
                r.hdel(keys.WORKERS, hostname)

        threading.Thread(target=beat, name="promptbatch-heartbeat", daemon=True).start()


def _connect_signals(app: Celery, settings: Settings, resources: _ProcessResources,
                     heartbeat: _Heartbeat) -> None:
    """The worker's life: its heartbeat, the collector's set-up before the fork, each
    pool process's connections, and the grace of a warm shutdown."""

    def on_ready(sender: Any, **_: Any) -> None:
        if sender.app is not app:
            return
        controller = sender.controller
        heartbeat.start(controller.hostname, int(controller.concurrency))

    def on_init(sender: Any, **_: Any) -> None:
        if sender.app is app:  # before the pool processes fork: they inherit it
            gcpause.tune_for_service()
            warn_at_start(resources.prices, settings, PROVIDER_DEFAULT_MODELS)

    def on_process_init(**_: Any) -> None:  # a pool process, after the fork
        try:
            resources.runner()
        except Exception:  # the first batch builds it again, and fails with the reason
            log.exception("could not set up the worker process's connections")

    def on_shutdown(sender: Any, **_: Any) -> None:
        heartbeat.stop.set()

    def on_shutting_down(sig: str = "", how: str = "", **_: Any) -> None:
        # A warm shutdown (SIGTERM, a first Ctrl-C) lets the running batches finish, as
        # Celery does, but for ``shutdown_grace_s`` at most: then a cold one.
        if how != "Warm":
            return
        grace = settings.shutdown_grace_s
        log.warning("warm shutdown (%s): no new batch starts; waiting up to %g s for the "
                    "running ones (Ctrl-C again stops at once)", sig, grace)
        timer = threading.Timer(grace, _go_cold, args=(grace,))
        timer.daemon = True
        timer.start()

    worker_init.connect(on_init, weak=False)
    worker_process_init.connect(on_process_init, weak=False)
    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    worker_shutting_down.connect(on_shutting_down, weak=False)


def _go_cold(grace: float) -> None:
    """The grace of a warm shutdown is over: Celery's cold shutdown (SIGQUIT) ends the
    batches still running; they run again elsewhere."""
    log.warning("batches still running %g s after the warm shutdown began: stopping them",
                grace)
    os.kill(os.getpid(), signal.SIGQUIT)


def _lane_tasks(app: Celery, settings: Settings, resources: _ProcessResources) -> None:
    """The half-price lane's tasks (``workers.lane``). A task that fails (a provider, Redis
    or the store down) is not retried here: the scheduler sends it again when the
    provider batch is next due."""
    limit = max(settings.task_time_limit_s, int(settings.batch_api_submit_retry_s) - 30)
    options: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True,
                               "ignore_result": True, "time_limit": limit,
                               "soft_time_limit": max(1, limit - 5)}

    @app.task(name=LANE_SUBMIT, **options)
    def lane_submit(batch_id: str) -> dict[str, Any]:
        """Create a recorded provider batch at its provider, once."""
        return resources.lane().submit(batch_id)

    @app.task(name=LANE_POLL, **options)
    def lane_poll(batch_id: str) -> dict[str, Any]:
        """Poll a provider batch; record its results once it ended."""
        return resources.lane().poll(batch_id)


def create_app(settings: Settings | None = None, redis_url: str | None = None) -> Celery:
    """The workers' Celery app: configuration from ``settings``, task ``process_batch``."""
    settings = settings or Settings()
    url = redis_url or settings.redis_url
    app = build_celery(settings, "promptbatch", url)

    def resend(poison: str, new_batch: str, job_id: str, job_cls: int) -> None:
        app.send_task(PROCESS_BATCH, queue=keys.queue(job_cls), task_id=new_batch,
                      kwargs={"batch_id": new_batch, "send_id": uuid.uuid4().hex,
                              "job_ids": [job_id], "cls": job_cls},
                      argsrepr="()", kwargsrepr=batch_repr(job_cls, [job_id]) +
                      f" (isolated from poison batch {poison})", ignore_result=True)

    resources = _ProcessResources(settings, url, resend)
    heartbeat = _Heartbeat(url)

    # ``throws``: a batch with failed jobs ends as an expected failure (logged without a
    # traceback). ``acks_on_failure``: its message is acknowledged as a success's is (it
    # is over: nothing runs again).
    @app.task(name=PROCESS_BATCH, bind=True, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True, throws=(JobsFailed,), acks_on_failure=True)
    def process_batch(self: Task[Any, Any], batch_id: str, send_id: str, job_ids: list[str],
                      similarity: float | None = None, cls: int = 2,
                      prefix_hint: int = 0, estimate_s: float = 0.0,
                      replicas: list[int] | None = None) -> dict[str, Any]:
        """Run one batch of jobs: one provider call, one stored result per job. Returns
        the batch's counts; raises ``JobsFailed`` with them when a job failed."""
        runner = resources.runner()
        try:
            delivery = self.request.delivery_info or {}
            summary = runner.run(batch_id, send_id, job_ids, similarity, cls, prefix_hint,
                                 retries=self.request.retries or 0, estimate_s=estimate_s,
                                 redelivered=bool(delivery.get("redelivered")),
                                 replicas=replicas)
        except SoftTimeLimitExceeded:
            limit = settings.task_time_limit_s
            failed = runner.fail_running(batch_id, job_ids, f"the provider call took longer "
                                         f"than the task time limit ({limit} s)")
            log.warning("batch %s hit the time limit; %d jobs failed", batch_id, failed)
            summary = {"class": class_name(str(cls)), "size": len(job_ids), "failed": failed,
                       "jobs": 0, "timed_out": True}
        except (redis.RedisError, SQLAlchemyError) as exc:
            # Redis or the SQL store stayed down longer than the batch could wait: run it
            # again later (the same send, so it may; results already stored are kept; a
            # retry is a new message, not counted as a delivery after a lost worker).
            delay = min(30, 2 ** self.request.retries)
            log.warning("batch %s: %s; retrying in %d s", batch_id, exc, delay)
            raise self.retry(exc=exc, countdown=delay, max_retries=20) from exc
        if summary.get("failed"):
            raise JobsFailed(summary)
        return summary

    _lane_tasks(app, settings, resources)
    _connect_signals(app, settings, resources, heartbeat)
    app.promptbatch_settings = settings  # type: ignore[attr-defined]
    return app

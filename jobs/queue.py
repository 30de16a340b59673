"""The Redis side of a job's life: ``RedisQueue``, a facade over the steps of each role.

Layout (names in ``config.keys``): a job is a hash ``pb:job:{id}`` (``spec`` JSON,
``state``, ``sid`` of its intake entry, ``batch``); ``pb:intake`` is a stream holding one
entry per job not yet sent; a job's result lives in Celery's own result key
``celery-task-meta-{id}``, so ``AsyncResult(job_id)`` works for any Celery user.

Each role's steps live in a module of their own under ``jobs/steps/``, each step's Lua in
``jobs/lua/``:

=====================  ==============  ==================================================
module                 class           steps
=====================  ==============  ==================================================
``steps/submit.py``    ``Submit``      stage, publish, withdraw, enqueue, cancel
``steps/dispatch.py``  ``Dispatch``    intake, lease, claim, acknowledge, expire, requeue
``steps/runs.py``      ``Runs``        start a run, mark running, split, end the run
``steps/results.py``   ``Results``     finish (first wins), the done stream, read results
``steps/cache.py``     ``CacheSteps``  cache entries, coalescing, hits, purges
``streams.py``         ``Sink``        a job's output stream, and its readers
=====================  ==============  ==================================================
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobs.steps.cache import CacheSteps
from jobs.steps.dispatch import Dispatch, Reading
from jobs.steps.meta import celery_meta, result_from_meta
from jobs.steps.results import FINAL_JOB_TTL_S, FINISH_CHUNK, Results
from jobs.steps.runs import Runs
from jobs.steps.submit import TOMBSTONE_TTL_S, Submit

__all__ = [
    "FINAL_JOB_TTL_S",
    "FINISH_CHUNK",
    "TOMBSTONE_TTL_S",
    "Reading",
    "RedisQueue",
    "celery_meta",
    "connect",
    "result_from_meta",
]


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


class RedisQueue(CacheSteps, Submit, Dispatch, Runs, Results):
    """The Redis side of a job's life: every role's steps on one client."""

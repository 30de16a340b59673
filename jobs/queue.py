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
``steps/lane.py``      ``LaneSteps``   claim for a provider batch, back to the fast path
``streams.py``         ``Sink``        a job's output stream, and its readers
=====================  ==============  ==================================================
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio import sentinel as aiosentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from config.redisaddr import SentinelAddress, is_sentinel
from jobs.steps.cache import CacheSteps
from jobs.steps.dispatch import Dispatch, Reading
from jobs.steps.lane import LaneSteps
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
    "aconnect",
    "celery_meta",
    "connect",
    "result_from_meta",
    "twin",
]


def connect(url: str, *, socket_timeout: float = 10.0,
            connect_timeout: float = 5.0, fail_fast: bool = False,
            decode_responses: bool = True) -> redis.Redis:
    """A Redis client with timeouts and health checks, so nothing hangs on a stalled server.

    ``fail_fast``: no reconnect-and-retry, so a caller answering users (the API) learns
    within ``socket_timeout`` that Redis is down. A ``redis+sentinel://`` address
    (``config.redisaddr``) gives a client of the primary the sentinels name: after a
    connection error or a READONLY reply (the old primary, now a replica) its next
    connection asks them again, so it follows a failover.
    """
    extra: dict[str, Any] = {}
    if fail_fast:
        extra["retry"] = Retry(NoBackoff(), 0)
    options: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": False,
        **extra,
    }
    if is_sentinel(url):
        address = SentinelAddress.parse(url)
        client: redis.Redis = _sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            address, socket_timeout, connect_timeout).master_for(
            address.master, redis_class=redis.Redis, db=address.db, username=address.username,
            password=address.password, **options)
        return client
    return redis.Redis.from_url(url, **options)


def aconnect(url: str) -> aioredis.Redis:
    """``connect`` for asyncio (the API's streams)."""
    if is_sentinel(url):
        address = SentinelAddress.parse(url)
        sentinel = aiosentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            address.sentinels, sentinel_kwargs=_sentinel_kwargs(address, 10.0, 5.0),
            socket_timeout=10.0, socket_connect_timeout=5.0)
        aclient: aioredis.Redis = sentinel.master_for(
            address.master, redis_class=aioredis.Redis, db=address.db,
            username=address.username, password=address.password, decode_responses=True)
        return aclient
    return aioredis.Redis.from_url(url, decode_responses=True)


def twin(client: redis.Redis, **overrides: Any) -> redis.Redis:
    """A client of the same server (or the same Sentinel primary) with its own pool and
    ``overrides`` to its connection options (``decode_responses=False``, say)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, **overrides}
    if isinstance(pool, SentinelConnectionPool):
        kwargs.pop("connection_pool", None)
        kwargs.pop("connection_class", None)
        return redis.Redis(connection_pool=SentinelConnectionPool(  # type: ignore[no-untyped-call, unused-ignore]
            pool.service_name, pool.sentinel_manager, **kwargs))
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **kwargs))


def _sentinel_kwargs(address: SentinelAddress, socket_timeout: float,
                     connect_timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": min(socket_timeout, 2.0),
                              "socket_connect_timeout": min(connect_timeout, 2.0)}
    if address.sentinel_password:
        kwargs["password"] = address.sentinel_password
    return kwargs


def _sentinel(address: SentinelAddress, socket_timeout: float,
              connect_timeout: float) -> Sentinel:
    return Sentinel(address.sentinels,  # type: ignore[no-untyped-call, unused-ignore]
                    sentinel_kwargs=_sentinel_kwargs(address, socket_timeout, connect_timeout))


class RedisQueue(CacheSteps, Submit, Dispatch, Runs, Results, LaneSteps):
    """The Redis side of a job's life: every role's steps on one client."""

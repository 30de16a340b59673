"""What every service checks before it starts: Redis and the job store answer, the
store's schema is current, and it is the store the deployment's other processes use."""

from __future__ import annotations

import logging
import threading

import redis
from sqlalchemy.exc import OperationalError

from config.redisaddr import safe_url
from jobs.queue import RedisQueue
from jobs.store import JobStore

log = logging.getLogger(__name__)


def wait_until_ready(queue: RedisQueue, store: JobStore, redis_url: str,
                     stop: threading.Event | None = None) -> bool:
    """Wait (with backoff) while Redis or the store cannot be reached; then check the
    schema and bind the store to Redis. Returns False if ``stop`` was set while waiting.

    Raises ``SchemaBehind`` or ``StoreMismatch``: a service must not start then.
    """
    stop = stop or threading.Event()
    delay = 0.2
    while not stop.is_set():
        try:
            queue.r.ping()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.warning("waiting for Redis at %s: %s", safe_url(redis_url), exc)
        else:
            try:
                store.check_schema()
                queue.bind_store(store.store_id(), store.where)
                return True
            except OperationalError as exc:
                log.warning("waiting for the job store at %s: %s", store.where,
                            str(exc).splitlines()[0])
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("waiting for Redis at %s: %s", safe_url(redis_url), exc)
        stop.wait(delay)
        delay = min(delay * 2, 5.0)
    return False

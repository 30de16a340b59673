"""The Redis broker transport, publishing through one client per channel.

kombu's Redis channel builds a new redis-py client for every message it publishes
(``Channel.conn_or_acquire``), and redis-py builds its table of response callbacks in each:
about 0.25 ms per message on a 2-core machine, and a batch costs three to five messages
(the task, its ``task-sent`` event, the worker's events). This channel keeps one client per
connection pool instead; the client holds no state of its own beyond the pool, so nothing
else changes. Selected by ``config.celery`` for ``redis://`` brokers and, as ``SentinelTransport``,
for a primary found through Sentinel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class _KeptPublisher:
    """Publishes through one client per connection pool (mixed into a kombu channel)."""

    _publisher: Any = None
    pool: Any
    connection: Any
    _pool: Any

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._pool is None and self.connection.client is None:
            # The connection was closed after Redis went away (Celery closes it to
            # reconnect); kombu would build a pool from nothing and fail with an
            # AttributeError that stops the worker. A connection error is what the close
            # ignores; the unacknowledged messages stay in Redis, restored as usual.
            raise redis.ConnectionError("the broker connection is closed")
        pool = self.pool  # a new pool after a reconnect: a new client for it
        if self._publisher is None or self._publisher.connection_pool is not pool:
            self._publisher = self._create_client()  # type: ignore[attr-defined]
        yield self._publisher


class Channel(_KeptPublisher, kombu_redis.Channel):
    """kombu's Redis channel with its publishing client kept."""


class SentinelChannel(_KeptPublisher, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with its publishing client kept (after a failover the
    channel's pool is new, and so is the client)."""


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel``."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with ``SentinelChannel``."""

    Channel = SentinelChannel

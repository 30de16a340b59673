"""The Redis broker transport, publishing through one client per channel.

kombu's Redis channel builds a new redis-py client for every message it publishes
(``Channel.conn_or_acquire``), and redis-py builds its table of response callbacks in each:
about 0.25 ms per message on a 2-core machine, and a batch costs three to five messages
(the task, its ``task-sent`` event, the worker's events). This channel keeps one client per
connection pool instead; the client holds no state of its own beyond the pool, so nothing
else changes. Selected by ``config.celery`` for ``redis://`` brokers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with its publishing client kept."""

    _publisher: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool  # a new pool after a reconnect: a new client for it
        if self._publisher is None or self._publisher.connection_pool is not pool:
            self._publisher = self._create_client()  # type: ignore[attr-defined]
        yield self._publisher


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel``."""

    Channel = Channel

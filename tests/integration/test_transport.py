"""The broker transport: kombu's Redis transport, publishing through one client."""

from __future__ import annotations

import pytest
import redis

from config import keys
from config.celery import build_celery, celery_config
from config.settings import Settings
from config.transport import Transport

pytestmark = pytest.mark.integration


def test_messages_are_published_through_one_client_and_arrive(settings: Settings,
                                                                r: redis.Redis) -> None:
    app = build_celery(settings)
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        clients = set()
        for i in range(3):
            app.send_task("noop", args=[i], queue=keys.queue(2), routing_key=keys.queue(2),
                          connection=conn)
            with channel.conn_or_acquire() as client:
                clients.add(id(client))
        assert len(clients) == 1  # kombu alone builds a client per message
    assert r.llen(keys.queue(2)) == 3
    app.close()


def test_tls_brokers_keep_kombus_own_transport_and_urls_keep_their_scheme(
        settings: Settings) -> None:
    from kombu.transport.redis import Transport as KombuTransport

    tls = settings.redis_url.replace("redis://", "rediss://")
    app = build_celery(settings, redis_url=tls)
    with app.connection() as conn:
        assert type(conn.transport) is KombuTransport
    app = build_celery(settings)
    with app.connection() as conn:  # what Flower's Broker tab parses
        assert conn.as_uri().startswith("redis://")
        assert isinstance(conn.transport, Transport)
    assert "broker_transport" not in celery_config(settings)

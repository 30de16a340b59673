"""The Celery configuration, built from :class:`~config.settings.Settings`.

Only JSON crosses the broker; tasks are acknowledged after they run and re-queued when a
worker dies; each worker reserves one task per pool process; the class queues are
consumed strictly in priority order (kombu's ``queue_order_strategy='priority'``: the
default is round robin).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.transport import TRANSPORT_ALIASES

from config import keys
from config.redisaddr import SentinelAddress, is_sentinel
from config.settings import PRIORITY_NAMES, Settings

#: Name of the batch task, used by the scheduler's ``send_task``.
PROCESS_BATCH = "promptbatch.process_batch"
#: Tasks of the half-price lane (a provider's own batch endpoint), sent by the scheduler:
#: upload a recorded provider batch; poll one (and record its results once it ended).
LANE_SUBMIT = "promptbatch.lane_submit"
LANE_POLL = "promptbatch.lane_poll"
#: Job ids a batch task's description names before "+N more".
REPR_IDS = 3


def batch_repr(cls: int, job_ids: list[str], deployment: str = "",
               similarity: float | None = None) -> str:
    """How a batch task reads in Flower and in the worker's log (its ``kwargsrepr``):
    class by name, size, provider and model, similarity and the first job ids, short
    enough that Celery does not cut it (about 1 KB). Never a prompt or a key."""
    shown = ", ".join(job_ids[:REPR_IDS])
    more = f" +{len(job_ids) - REPR_IDS} more" if len(job_ids) > REPR_IDS else ""
    name = PRIORITY_NAMES[cls] if 0 <= cls < len(PRIORITY_NAMES) else str(cls)
    sim = f", similarity {similarity:.2f}" if similarity is not None else ""
    return (f"{name} batch of {len(job_ids)} for {deployment or 'its deployment'}{sim}: "
            f"jobs {shown}{more}")


#: kombu resolves these schemes to promptbatch's transports, so a broker URL keeps its own
#: scheme everywhere it is shown or parsed (Flower's Broker tab reads the scheme).
_ALIASES = {"redis": "config.transport:Transport",
            "sentinel": "config.transport:SentinelTransport"}
TRANSPORT_ALIASES.update(_ALIASES)


def celery_config(settings: Settings, redis_url: str | None = None) -> dict[str, Any]:
    """The Celery settings for ``settings`` (``redis_url`` overrides ``settings.redis_url``)."""
    url = redis_url or settings.redis_url
    if not url:
        raise ValueError(
            "redis_url is empty: set PROMPTBATCH_REDIS_URL (for example redis://127.0.0.1:6379/0) "
            "or use `promptbatch run`, which starts an embedded server."
        )
    exchange = Exchange("promptbatch", type="direct")
    redis_options: dict[str, Any] = {
        "socket_timeout": 30.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }
    # kombu's Redis transport, publishing through one client (``config.transport``),
    # which the ``redis://`` and ``sentinel://`` schemes name (``_ALIASES``); TLS and other
    # schemes keep kombu's own.
    sentinel: dict[str, object] = {}
    backend = url
    broker_options: dict[str, Any] = {}
    if is_sentinel(url):  # kombu's and Celery's own Sentinel support, as they spell it
        address = SentinelAddress.parse(url)
        url = backend = address.kombu_url()
        sentinel = address.transport_options()
    if settings.amqp:
        # RabbitMQ carries the batch tasks; Redis keeps everything else. Durable queues and
        # persistent messages survive a broker restart; a publish returns once the broker
        # has it (confirms); a lost worker's unacknowledged batch is delivered again as
        # soon as its connection closes (no visibility timeout).
        url = settings.broker_url
        broker_options = {"confirm_publish": True}
    return {
        "broker_url": url,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": [Queue(q, exchange, routing_key=q, durable=True) for q in keys.QUEUES],
        "task_default_queue": keys.queue(2),
        "task_default_exchange": "promptbatch",
        "task_default_routing_key": keys.queue(2),
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(1, settings.task_time_limit_s - 5),
        "result_expires": settings.result_ttl_s,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": False,  # Flower sees STARTED from the events
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": broker_options if settings.amqp else {
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            **redis_options,
            **sentinel,
        },
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}, **sentinel},
        "redis_socket_timeout": redis_options["socket_timeout"],
        "redis_socket_connect_timeout": redis_options["socket_connect_timeout"],
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": redis_options["health_check_interval"],
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
    }


def build_celery(settings: Settings, main: str = "promptbatch",
                 redis_url: str | None = None) -> Celery:
    """A Celery app configured from ``settings`` (no tasks registered)."""
    app = Celery(main, set_as_current=False)
    app.config_from_object(celery_config(settings, redis_url))
    return app

"""The API's Prometheus metrics: requests by route and status, and their time; ``/metrics``.

With several uvicorn worker processes the API runs in prometheus-client's multiprocess
mode (``promptbatch api --workers N`` sets it up), and ``/metrics`` on any of them answers
the sum of all. The job counters (submitted, finished by state) are the cluster's and come
from the active scheduler's ``/metrics``: the API counts requests, not jobs.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.telemetry import LATENCY_BUCKETS, registry_for_process

REQUESTS = Counter("promptbatch_http_requests", "HTTP requests answered by the API.",
                   ["method", "route", "status"])
SECONDS = Histogram("promptbatch_http_request_duration_seconds", "Time to answer an HTTP "
                    "request (a submit with ?wait includes the wait).", ["method", "route"],
                    buckets=LATENCY_BUCKETS)


class MetricsMiddleware:
    """Counts each request under its route's template (``/v1/jobs/{job_id}``, not the id,
    so one series per route); requests that match no route count as ``unmatched``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route: Any = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            if name != "/metrics":
                method = scope.get("method", "")
                REQUESTS.labels(method, name, str(status)).inc()
                SECONDS.labels(method, name).observe(time.perf_counter() - started)


async def metrics_endpoint(_: Request) -> Response:
    """Prometheus text format of this API (all its worker processes)."""
    return Response(generate_latest(registry_for_process()), media_type=CONTENT_TYPE_LATEST)

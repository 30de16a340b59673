"""The HTTP API (FastAPI): the app, built from its families of routes.

``producers.jobs_routes`` (jobs, the cache, health), ``producers.openai_routes`` (the
OpenAI Files and Batches APIs), ``producers.openai_chat`` (OpenAI-compatible chat and
completions, streamed or not), ``producers.streaming`` (a job's stream); what they share
(errors, the body reader, the app's client) is ``producers.web``, the API keys
``producers.auth`` and the API's own records (keys, files, batches) ``producers.accounts``.

Every route but the health checks needs an API key (``Authorization: Bearer KEY`` or
``X-API-Key: KEY``, see ``producers.auth``); the key names the tenant, and every read,
cancel and list is scoped to it: another tenant's job answers 404 exactly like an unknown
id (an admin key may act for any tenant). Errors are JSON, ``{"error": {"type",
"message", "errors": [{"field", "message"}]}}``, and a refused request leaves nothing
behind. ``/docs`` serves Swagger UI from the package (no CDN). Served by ``promptbatch
api`` (uvicorn).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from config.settings import Settings
from jobs.prices import warn_at_start
from jobs.store import JobStore
from jobs.validation import PROVIDER_DEFAULT_MODELS
from producers.accounts import Accounts
from producers.client import Client
from producers.jobs_routes import router
from producers.models import uncallable
from producers.openai_batch import BatchError, BatchService
from producers.openapi_doc import install_openapi
from producers.web import install_errors

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application for ``settings``."""
    settings = settings or Settings()
    from producers.keys_routes import hide_keys_in_access_log

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hide_keys_in_access_log()
        store = JobStore.for_settings(settings, timeout_s=settings.api_dependency_timeout_s)
        client = Client(settings, store=store, fail_fast=True)
        client.submitter.vet = partial(uncallable, settings)  # only what it can call
        app.state.settings = settings
        app.state.client = client
        app.state.accounts = Accounts(store)
        app.state.batches = BatchService(settings, client, app.state.accounts)
        warn_at_start(client.submitter.prices, settings, PROVIDER_DEFAULT_MODELS)
        yield
        client.close()
        if getattr(app.state, "aioredis", None) is not None:
            await app.state.aioredis.aclose()

    from producers.admin_routes import router as admin_router
    from producers.keys_routes import router as keys_router
    from producers.models import router as models_router
    from producers.money_routes import router as money_router
    from producers.openai_routes import batch_error
    from producers.openai_routes import router as batch_router

    app = FastAPIOffline(
        title="promptbatch", version="0.1.0", lifespan=lifespan,
        description="Submit LLM prompts with priorities and deadlines; results come back per "
        "job. Authenticate with `Authorization: Bearer <key>` (or `X-API-Key`). Also speaks "
        "the OpenAI Files and Batches API.")
    install_errors(app)
    install_openapi(app)
    app.add_exception_handler(BatchError, batch_error)  # type: ignore[arg-type]
    from producers.openai_chat import router as chat_router
    from producers.streaming import router as stream_router

    app.include_router(router)
    app.include_router(batch_router)
    app.include_router(chat_router)
    app.include_router(stream_router)
    app.include_router(models_router)
    app.include_router(keys_router)
    app.include_router(money_router)
    app.include_router(admin_router)
    if settings.api_metrics:
        from producers.metrics import MetricsMiddleware, metrics_endpoint

        app.add_middleware(MetricsMiddleware)
        app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    return app




__all__ = ["create_app"]

"""The HTTP API (FastAPI): jobs for backend services, and the OpenAI Batch API.

Every route but the health checks needs an API key (``Authorization: Bearer KEY`` or
``X-API-Key: KEY``, see ``producers.auth``); the key names the tenant, and every read,
cancel and list is scoped to it: another tenant's job answers 404 exactly like an unknown
id (an admin key may act for any tenant). Errors are JSON, ``{"error": {"type",
"message", "errors": [{"field", "message"}]}}``, and a refused request leaves nothing
behind. ``/docs`` serves Swagger UI from the package (no CDN). Served by ``promptbatch
api`` (uvicorn).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from jobs.accounts import Accounts
from jobs.errors import (
    InvalidJob,
    JobNotFound,
    PromptBatchError,
    ServiceUnavailable,
    SubmitUnconfirmed,
    TenantQuotaExceeded,
)
from jobs.models import JobResult, JobSpec, JobState
from jobs.store import JobStore, StoredJob
from producers.auth import Caller, CallerDep, Unauthorized
from producers.client import Client
from producers.openai_batch import BatchError, BatchService
from producers.openapi_doc import install_openapi

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised inside a route to answer with a given status and message."""

    def __init__(self, status: int, kind: str, message: str,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.errors = errors or []


def _error(status: int, kind: str, message: str,
           errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if errors:
        body["errors"] = errors
    return JSONResponse({"error": body}, status_code=status)


class _Constant:
    """A NaN or Infinity found in a JSON body."""


def _find_constant(value: Any, path: str = "") -> str | None:
    if isinstance(value, _Constant):
        return path or "(body)"
    if isinstance(value, dict):
        for k, v in value.items():
            found = _find_constant(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_constant(v, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 413 over ``limit``, 400 if not UTF-8 JSON, 422 for NaN."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_body", f"the body is not UTF-8: {exc.reason}") from exc
    try:
        data = json.loads(text, parse_constant=lambda _: _Constant())
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_body", f"the body is not JSON: {exc}") from exc
    where = _find_constant(data)
    if where:
        raise ApiError(422, "invalid_request_error", "NaN and Infinity are not accepted",
                       [{"field": where, "message": "NaN and Infinity are not accepted"}])
    return data


def job_view(stored: StoredJob, result: JobResult | None = None) -> dict[str, Any]:
    """A job as the API shows it."""
    spec = stored.spec
    res = result or stored.result
    return {"id": spec.id, "object": "job", "state": (res.state if res else stored.state).value,
            "priority": spec.priority.label, "tenant": spec.tenant, "provider": spec.provider,
            "model": spec.model, "created_at": spec.created_at, "deadline": spec.deadline,
            "idempotency_key": spec.idempotency_key, "metadata": spec.metadata,
            "result": res.public() if res else None}


def _cursor(stored: StoredJob) -> str:
    raw = json.dumps([stored.spec.created_at, stored.spec.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return float(created), str(job_id)
    except (ValueError, TypeError) as exc:
        raise ApiError(422, "invalid_request_error", "cursor is not one this API gave out",
                       [{"field": "cursor", "message": "unknown cursor"}]) from exc


router = APIRouter()


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def client_of(request: Request) -> Client:
    """The app's client (Redis and SQL)."""
    return request.app.state.client  # type: ignore[no-any-return]


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    """Redis and the SQL store answer."""
    client = client_of(request)
    checks = {}
    for name, probe in (("redis", client.r.ping), ("sql", client.store.ping)):
        try:
            await asyncio.wait_for(run_in_threadpool(probe),
                                   _settings(request).api_dependency_timeout_s)
            checks[name] = "ok"
        except Exception as exc:  # any failure means: not ready
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", **checks},
                        status_code=200 if ready else 503)


@router.post("/v1/jobs", status_code=201, tags=["jobs"],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"oneOf": [
                     {"$ref": "#/components/schemas/JobRequest"},
                     {"$ref": "#/components/schemas/JobsRequest"}]}}}}})
async def submit(request: Request, caller: CallerDep,
                 idempotency_key: Annotated[str | None, Header()] = None) -> Any:
    """Submit one job, or ``{"jobs": [...]}`` for many (all or none are accepted).
    Returns the ids at once. With an admin key, a job may name its ``tenant``."""
    settings = _settings(request)
    body = await read_json(request, settings.api_max_body_bytes)
    many = isinstance(body, dict) and "jobs" in body and set(body) == {"jobs"}
    items = body["jobs"] if many else [body]
    if not isinstance(items, list) or not items:
        raise ApiError(422, "invalid_request_error", "'jobs' must be a non-empty list",
                       [{"field": "jobs", "message": "must be a non-empty list"}])
    if len(items) > settings.api_max_jobs_per_request:
        raise ApiError(413, "request_too_large",
                       f"at most {settings.api_max_jobs_per_request} jobs per request")
    done = await run_in_threadpool(_submit, client_of(request), items, caller,
                                   idempotency_key, many)
    if many:
        return {"object": "list", "ids": [job_id for job_id, _ in done]}
    return {"id": done[0][0], "object": "job", "state": done[0][1].value}


@router.get("/v1/jobs/{job_id}", tags=["jobs"])
async def get_job(job_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """A job's state, and its result once final (by its id, or by your ``client_id``)."""
    client = client_of(request)
    stored = await run_in_threadpool(client.store.find, job_id, caller.scope)
    if stored is None:
        raise JobNotFound(job_id)
    result = None if stored.result else (await run_in_threadpool(
        client.queue.results, [stored.spec.id]))[0]
    view = job_view(stored, result)
    if result is None and not stored.state.final:
        state = (await run_in_threadpool(client.queue.states, [stored.spec.id]))[0]
        view["state"] = state or stored.state.value
    return view


@router.get("/v1/jobs/{job_id}/result", tags=["jobs"])
async def get_result(job_id: str, request: Request, caller: CallerDep,
                     wait: Annotated[float, Query(ge=0)] = 0.0) -> JSONResponse:
    """The job's result, waiting up to ``wait`` seconds for it (202 if still pending)."""
    client = client_of(request)
    stored = await run_in_threadpool(client.store.find, job_id, caller.scope)
    if stored is None:
        raise JobNotFound(job_id)
    job_id = stored.spec.id
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, _settings(request).api_max_wait_s)
    delay = 0.005
    while True:
        result = stored.result or (await run_in_threadpool(client.queue.results, [job_id]))[0]
        if result is not None:
            return JSONResponse(result.public())
        if loop.time() >= deadline:
            state = (await run_in_threadpool(client.queue.states, [job_id]))[0]
            return JSONResponse({"id": job_id, "state": state or stored.state.value},
                                status_code=202)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


@router.delete("/v1/jobs/{job_id}", tags=["jobs"])
async def cancel(job_id: str, request: Request, caller: CallerDep) -> JSONResponse:
    """Cancel a job that has not started (409 with its state if too late)."""
    state = await run_in_threadpool(client_of(request).cancel, job_id, caller.scope)
    body = {"id": job_id, "state": state.value}
    return JSONResponse(body, status_code=200 if state is JobState.CANCELLED else 409)


@router.delete("/v1/cache", tags=["cache"])
async def purge_cache(request: Request, caller: CallerDep,
                      tenant: Annotated[str | None, Query(
                          description="Only this tenant's entries (an admin key may name "
                          "any; another key purges only its own tenant's).")] = None,
                      model: Annotated[str | None, Query(
                          description="Only this model's ('provider|model', or a model "
                          "name).")] = None,
                      key: Annotated[str | None, Query(
                          description="Only this entry (its key or hash).")] = None,
                      ) -> dict[str, Any]:
    """Delete cached results; answers how many went."""
    if not caller.admin:
        if tenant not in (None, caller.tenant):
            raise ApiError(403, "permission_error", f"this API key may purge only tenant "
                           f"{caller.tenant!r}'s cache")
        tenant = caller.tenant
    if key and ":" in key and tenant and not key.startswith(f"{tenant}|"):
        raise ApiError(403, "permission_error", f"that entry is not tenant {tenant!r}'s")
    from jobs.cache import purge

    n = await run_in_threadpool(purge, client_of(request).queue, tenant=tenant, model=model,
                                key=key)
    return {"object": "cache.purge", "purged": n}


@router.get("/v1/jobs", tags=["jobs"])
async def list_jobs(request: Request, caller: CallerDep, state: JobState | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    cursor: str | None = None,
                    tenant: Annotated[str | None, Query(
                        description="Admin keys: list this tenant's jobs.")] = None,
                    ) -> dict[str, Any]:
    """The caller's jobs, oldest first; pass ``next_cursor`` on to page on."""
    if tenant is not None and not caller.admin and tenant != caller.tenant:
        raise ApiError(403, "permission_error", "only an admin key may list another "
                       "tenant's jobs", [{"field": "tenant", "message": "not your tenant"}])
    tenant = tenant or caller.tenant
    after = _parse_cursor(cursor) if cursor else None
    rows = await run_in_threadpool(client_of(request).store.list_jobs, tenant,
                                   state=state, limit=limit, after=after)
    return {"object": "list", "data": [job_view(r) for r in rows],
            "next_cursor": _cursor(rows[-1]) if len(rows) == limit else None}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application for ``settings``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = JobStore.for_settings(settings, timeout_s=settings.api_dependency_timeout_s)
        client = Client(settings, store=store, fail_fast=True)
        app.state.settings = settings
        app.state.client = client
        app.state.accounts = Accounts(store)
        app.state.batches = BatchService(settings, client, app.state.accounts)
        yield
        client.close()

    from producers.openai_routes import batch_error
    from producers.openai_routes import router as batch_router

    app = FastAPIOffline(
        title="promptbatch", version="0.1.0", lifespan=lifespan,
        description="Submit LLM prompts with priorities and deadlines; results come back per "
        "job. Authenticate with `Authorization: Bearer <key>` (or `X-API-Key`). Also speaks "
        "the OpenAI Files and Batches API.")
    _install_errors(app)
    install_openapi(app)
    app.add_exception_handler(BatchError, batch_error)  # type: ignore[arg-type]
    from producers.openai_chat import router as chat_router
    from producers.streaming import router as stream_router

    app.include_router(router)
    app.include_router(batch_router)
    app.include_router(chat_router)
    app.include_router(stream_router)
    if settings.api_metrics:
        from producers.metrics import MetricsMiddleware, metrics_endpoint

        app.add_middleware(MetricsMiddleware)
        app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    return app


def _submit(client: Client, items: list[Any], caller: Caller, header_key: str | None,
            many: bool) -> list[tuple[str, JobState]]:
    requests = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            named = item.get("tenant")
            if named is not None and named != caller.tenant and not caller.admin:
                raise InvalidJob([(f"jobs.{i}.tenant" if many else "tenant",
                                   f"this API key belongs to tenant {caller.tenant!r}; only "
                                   "an admin key may submit for another tenant (leave "
                                   "'tenant' out, or name your own)")])
            item = {**item, "tenant": named or caller.tenant}
            if header_key and "idempotency_key" not in item:
                item["idempotency_key"] = f"{header_key}:{i}" if many else header_key
        requests.append(item)
    try:
        return client.submit_many_states(requests)
    except InvalidJob as exc:
        if many and exc.line is not None:
            raise InvalidJob([(f"jobs.{exc.line - 1}.{f}", m) for f, m in exc.errors]) from exc
        raise


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.kind, exc.message, exc.errors)

    @app.exception_handler(Unauthorized)
    async def unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return _error(401, "authentication_error", exc.message)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p not in ("query", "path",
                                                                          "header", "body")),
                   "message": str(e["msg"])} for e in exc.errors()]
        return _error(422, "invalid_request_error",
                      "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)

    @app.exception_handler(InvalidJob)
    async def invalid(_: Request, exc: InvalidJob) -> JSONResponse:
        return _error(422, "invalid_request_error", str(exc),
                      [{"field": f, "message": m} for f, m in exc.errors])

    @app.exception_handler(JobNotFound)
    async def not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return _error(404, "not_found_error", str(exc))

    @app.exception_handler(TenantQuotaExceeded)
    async def quota(_: Request, exc: TenantQuotaExceeded) -> JSONResponse:
        return _error(429, "rate_limit_error", str(exc))

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("dependency unavailable: %s", exc)
        return _error(503, "service_unavailable", "Redis or the job store is unavailable; "
                      "nothing was changed, try again shortly")

    for kind in (ServiceUnavailable, redis.RedisError, SQLAlchemyError):
        app.add_exception_handler(kind, unavailable)

    @app.exception_handler(SubmitUnconfirmed)
    async def unconfirmed(_: Request, exc: SubmitUnconfirmed) -> JSONResponse:
        log.warning("submit unconfirmed: %s", exc)
        body = {"error": {"type": "service_unavailable", "message": str(exc),
                          "ids": exc.job_ids}}
        return JSONResponse(body, status_code=503)

    @app.exception_handler(PromptBatchError)
    async def other(_: Request, exc: PromptBatchError) -> JSONResponse:
        return _error(400, "invalid_request_error", str(exc))

    @app.exception_handler(TimeoutError)
    async def timeout(request: Request, exc: TimeoutError) -> Response:
        return await unavailable(request, exc)


__all__ = ["ApiError", "JobSpec", "create_app", "read_json"]

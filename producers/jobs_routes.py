"""The job routes: submit, read, wait for, cancel and list jobs; purge the cache; health.

Every route but the health checks needs an API key; reads, cancels and lists are scoped
to the key's tenant (an admin key may act for any)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from jobs import gcpause, jsonbody
from jobs.errors import (
    InvalidJob,
    JobNotFound,
)
from jobs.models import JobResult, JobState
from jobs.store import StoredJob
from producers.auth import Caller, CallerDep, TenantQuery
from producers.client import Client
from producers.web import ApiError, bounded, client_of, read_json, settings_of

log = logging.getLogger(__name__)


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


#: The longest cursor this API gives out, with room to spare (a time and a job id).
_CURSOR_MAX = 1024
#: The longest a caller may ask ``wait`` for (the API waits at most ``api_max_wait_s``).
WAIT_MAX_S = 86_400.0


def _parse_cursor(cursor: str) -> tuple[float, str]:
    """A cursor's (created_at, id): only a time and an id of the sizes this API gives out
    are taken, so no number decoded from it can overflow."""
    try:
        if len(cursor) > _CURSOR_MAX:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = jsonbody.parse(raw, 2)
        if (isinstance(created, bool) or not isinstance(created, int | float)
                or not 0 <= created <= 1e11 or not isinstance(job_id, str)
                or len(job_id) > 255):
            raise ValueError("not a time and an id")
        return float(created), job_id
    except (ValueError, TypeError) as exc:
        raise ApiError(422, "invalid_request_error", "cursor is not one this API gave out",
                       [{"field": "cursor", "message": "unknown cursor"}]) from exc


router = APIRouter()


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
                                   settings_of(request).api_dependency_timeout_s)
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
    settings = settings_of(request)
    body = await read_json(request, settings.api_max_body_bytes, "api_max_body_bytes")
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
async def get_job(job_id: str, request: Request, caller: CallerDep,
                  tenant: TenantQuery = None) -> dict[str, Any]:
    """A job's state, and its result once final (by its id, or by your ``client_id``;
    409 listing the tenants when an admin key's id names several tenants' jobs)."""
    client = client_of(request)
    stored = await run_in_threadpool(client.store.find, job_id, caller.scope_to(tenant))
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
                     wait: Annotated[float, Query(ge=0, le=WAIT_MAX_S)] = 0.0,
                     tenant: TenantQuery = None) -> JSONResponse:
    """The job's result, waiting up to ``wait`` seconds for it (202 if still pending)."""
    client = client_of(request)
    stored = await run_in_threadpool(client.store.find, job_id, caller.scope_to(tenant))
    if stored is None:
        raise JobNotFound(job_id)
    job_id = stored.spec.id
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, settings_of(request).api_max_wait_s)
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


@router.post("/v1/jobs/results", tags=["jobs"])
async def many_results(request: Request, caller: CallerDep) -> dict[str, Any]:
    """The results of many jobs at once: ``{"ids": [...], "wait": seconds}`` (up to
    ``api_max_jobs_per_request`` ids). Answers as soon as at least one of them is final
    (or after ``wait``, at most ``api_max_wait_s``): ``data`` holds the final ones'
    results, ``pending`` the others, ``unknown`` the ids the caller has no job of."""
    settings = settings_of(request)
    body = await read_json(request, settings.api_max_body_bytes, "api_max_body_bytes")
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
        raise ApiError(422, "invalid_request_error", "'ids' must be a non-empty list of job ids",
                       [{"field": "ids", "message": "a non-empty list of job ids"}])
    if len(ids) > settings.api_max_jobs_per_request:
        raise ApiError(413, "request_too_large",
                       f"at most {settings.api_max_jobs_per_request} ids per request")
    wait = bounded(body.get("wait", 0), "wait", 0, WAIT_MAX_S, " seconds")
    client = client_of(request)
    mine = await run_in_threadpool(client.store.owned, ids, caller.scope)
    wanted = [i for i in dict.fromkeys(ids) if i in mine]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, settings.api_max_wait_s)
    delay = 0.005
    checked_sql = False
    while True:
        found = [r for r in await run_in_threadpool(client.queue.results, wanted) if r]
        if not found and not checked_sql:  # results that left Redis: the store's
            checked_sql = True
            stored = await run_in_threadpool(client.store.outcomes, wanted)
            found = [JobResult.model_validate_json(raw) for raw in stored.values() if raw]
        if found or loop.time() >= deadline:
            done = {r.id for r in found}
            return {"object": "list", "data": [r.public() for r in found],
                    "pending": [i for i in wanted if i not in done],
                    "unknown": [i for i in dict.fromkeys(ids) if i not in mine]}
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


@router.delete("/v1/jobs/{job_id}", tags=["jobs"])
async def cancel(job_id: str, request: Request, caller: CallerDep,
                 tenant: TenantQuery = None) -> JSONResponse:
    """Cancel a job that has not started (by its id, or by your ``client_id``); 409 in
    the error shape, with the job's ``id`` and ``state``, if it is too late."""
    client = client_of(request)
    stored = await run_in_threadpool(client.store.find, job_id, caller.scope_to(tenant))
    if stored is None:
        raise JobNotFound(job_id)
    real_id = stored.spec.id
    state = await run_in_threadpool(client.cancel, real_id, stored.spec.tenant)
    if state is JobState.CANCELLED:
        return JSONResponse({"id": real_id, "state": state.value})
    why = ("it has started; only a job that has not started can be cancelled"
           if not state.final else f"it has already ended {state.value}")
    return JSONResponse({"error": {
        "type": "conflict", "message": f"job {real_id} cannot be cancelled: {why}",
        "id": real_id, "state": state.value},
        "id": real_id, "state": state.value},  # as before, for HTTP SDKs that read them
        status_code=409)


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
        with gcpause.paused():
            return client.submitter.submit_requests(requests, api_key=caller.key)
    except InvalidJob as exc:
        if many and exc.line is not None:
            raise InvalidJob([(f"jobs.{exc.line - 1}.{f}", m) for f, m in exc.errors]) from exc
        if exc.line is not None:  # one job: no line to name
            raise InvalidJob(exc.errors) from exc
        raise

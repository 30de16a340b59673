"""Routes of the OpenAI Files and Batches APIs (enough for the official SDK's batch flow)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile as StarletteUpload

from producers.auth import CallerDep
from producers.openai_batch import BatchError, BatchService, public
from producers.web import read_json, too_large

router = APIRouter()


def service(request: Request) -> BatchService:
    """The app's batch service."""
    return request.app.state.batches  # type: ignore[no-any-return]


async def batch_error(_: Request, exc: BatchError) -> JSONResponse:
    """A refused batch request, in OpenAI's error shape, naming the field."""
    return JSONResponse({"error": {"type": "invalid_request_error", "message": exc.message,
                                   "param": exc.field,
                                   "errors": [{"field": exc.field, "message": exc.message}]}},
                        status_code=exc.status)


@router.post("/v1/files", tags=["openai"])
async def create_file(request: Request, caller: CallerDep) -> dict[str, Any]:
    """Upload a batch input file (multipart: ``purpose``, ``file``)."""
    tenant = caller.tenant
    limit = request.app.state.settings.api_max_file_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large(limit, "api_max_file_bytes")
    form = await request.form()
    upload = form.get("file")
    purpose = form.get("purpose")
    if not isinstance(upload, StarletteUpload | UploadFile):
        raise BatchError(422, "file", "send the file as multipart field 'file'")
    if not isinstance(purpose, str):
        raise BatchError(422, "purpose", "send 'purpose' (batch)")
    content = await upload.read()
    if len(content) > limit:
        raise too_large(limit, "api_max_file_bytes")
    return await run_in_threadpool(service(request).create_file, tenant, purpose,
                                   upload.filename or "input.jsonl", content)

@router.get("/v1/files", tags=["openai"])
async def list_files(request: Request, caller: CallerDep,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     after: str | None = None,
                     purpose: str | None = None) -> dict[str, Any]:
    """The caller's files, newest first (their descriptions, not their content)."""
    return await run_in_threadpool(service(request).list_files, caller.tenant, limit, after,
                                   purpose)


@router.delete("/v1/files/{file_id}", tags=["openai"])
async def delete_file(file_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """Delete one of the caller's files."""
    return await run_in_threadpool(service(request).delete_file, caller.tenant, file_id)


@router.get("/v1/files/{file_id}", tags=["openai"])
async def get_file(file_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """A file's description."""
    tenant = caller.tenant
    return await run_in_threadpool(service(request).file_info, tenant, file_id)

@router.get("/v1/files/{file_id}/content", tags=["openai"])
async def file_content(file_id: str, request: Request, caller: CallerDep) -> Response:
    """A file's bytes (a batch's output or error JSONL)."""
    tenant = caller.tenant
    data = await run_in_threadpool(service(request).file_content, tenant, file_id)
    return Response(data, media_type="application/jsonl")

@router.post("/v1/batches", tags=["openai"])
async def create_batch(request: Request, caller: CallerDep) -> dict[str, Any]:
    """Start a batch from an uploaded file; its jobs run at bulk priority."""
    tenant = caller.tenant
    body = await read_json(request, request.app.state.settings.api_max_request_bytes,
                           "api_max_request_bytes")
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
        raise BatchError(422, "input_file_id", "input_file_id is required")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BatchError(422, "metadata", "metadata must be an object")
    record = await run_in_threadpool(
        service(request).create_batch, tenant, body["input_file_id"],
        str(body.get("endpoint", "")), str(body.get("completion_window", "")), metadata,
        caller.key)
    return public(record)

@router.get("/v1/batches/{batch_id}", tags=["openai"])
async def get_batch(batch_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """A batch, with its status and request counts."""
    tenant = caller.tenant
    return public(await run_in_threadpool(service(request).get, tenant, batch_id))

@router.post("/v1/batches/{batch_id}/cancel", tags=["openai"])
async def cancel_batch(batch_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """Cancel the batch's jobs that have not started."""
    tenant = caller.tenant
    return public(await run_in_threadpool(service(request).cancel, tenant, batch_id))

@router.get("/v1/batches", tags=["openai"])
async def list_batches(request: Request, caller: CallerDep,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None) -> dict[str, Any]:
    """The caller's batches, newest first."""
    tenant = caller.tenant
    return await run_in_threadpool(service(request).list, tenant, limit, after)

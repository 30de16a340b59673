"""OpenAI-compatible ``POST /v1/chat/completions`` and ``POST /v1/completions``: a backend
service changes only its ``base_url`` (and its key) and its calls become jobs of its
tenant, with priorities, deadlines, batching, the cache, retries and rate limits.

Each call is a job; the call waits for the job's result and answers in OpenAI's format.
Priority, deadline, idempotency key and cache mode come from headers (``X-Priority``,
``X-Timeout-S`` or ``X-Deadline``, ``Idempotency-Key``, ``X-Cache``) or from extra body
fields of the same names as in ``/v1/jobs`` (``priority``, ``timeout_s``, ``deadline``,
``idempotency_key``, ``cache``, ``metadata``), validated the same way. ``model`` is a public
name of ``model_aliases`` (-> ``provider|model``), ``provider|model``, or a model of the
default provider. A job that ends FAILED, EXPIRED or CANCELLED answers with a status the
official SDK maps to an exception (502, 504, 409) and ``x-should-retry: false`` (the SDK
would otherwise send the call again as a new job), and so does a call whose job outlasts
the API's longest wait (504, the job keeps running: its result is read by its id).

A call's job takes the fast path, whatever its priority: its caller waits on the
connection, and a provider's batch endpoint (the half-price lane) answers within a day.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jobs.errors import InvalidJob, JobNotFound
from jobs.models import JobResult, JobState
from jobs.store import StoredJob
from jobs.streams import Cursor
from producers import openai_answer as answer
from producers.auth import CallerDep
from producers.models import resolve_model
from producers.openai_request import job_fields, openai_errors
from producers.streaming import aio, follow, settled_in, stored_result, wait_bound
from producers.web import ApiError, bounded, client_of, read_json

router = APIRouter()

#: Headers that set a job field (as OpenAI callers' SDKs send extra headers).
_HEADERS = {"X-Priority": "priority", "X-Timeout-S": "timeout_s", "X-Deadline": "deadline",
            "Idempotency-Key": "idempotency_key", "X-Cache": "cache"}
#: The longest timeout a header may ask for (a job's ``timeout_s`` bound: a year).
_TIMEOUT_MAX_S = 365 * 24 * 3600.0


def _job(body: Any, request: Request, *, chat: bool,
         ) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``/v1/jobs`` request of an OpenAI call (``producers.openai_request``; errors
    name the OpenAI field), with its model resolved and its headers applied; and the
    header that gave each field it set, so that errors name what the caller wrote."""
    item = job_fields(body, chat=chat)
    item.update(resolve_model(request.app.state.settings, body["model"]))
    item["lane"] = "fast"  # a caller waits on the connection: never a provider batch
    names: dict[str, str] = {}
    for header, field in _HEADERS.items():
        value = request.headers.get(header)
        if value is not None and field not in body:
            item[field] = (bounded(value, header, 0, _TIMEOUT_MAX_S, " seconds")
                           if field == "timeout_s" else value)
            names[field] = header
    return item, names


def _as_written(exc: InvalidJob, names: dict[str, str]) -> ApiError:
    """A refused OpenAI call's error, each field named as the caller wrote it."""
    errors = []
    for field, message in exc.errors:
        name = field  # a field under a renamed one keeps its own path: stop.0
        for ours, theirs in names.items():
            if field == ours or field.startswith(f"{ours}."):
                name = theirs + field[len(ours):]
                break
        errors.append({"field": name, "message": message})
    return ApiError(422, "invalid_request_error",
                    "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)


async def _call(request: Request, caller: Any, *, chat: bool) -> Response:
    body = await read_json(request, request.app.state.settings.api_max_request_bytes,
                           "api_max_request_bytes")
    try:
        item, names = _job(body, request, chat=chat)
    except InvalidJob as exc:  # named as written already (n, audio, messages...)
        raise _as_written(exc, {}) from exc
    item["tenant"] = caller.tenant
    client = client_of(request)
    try:
        [(job_id, _)] = await run_in_threadpool(
            functools.partial(client.submitter.submit_requests, [item], api_key=caller.key))
    except InvalidJob as exc:
        if exc.errors and exc.errors[0][0] in ("provider", "model"):
            raise ApiError(404, "model_not_found", f"model {body.get('model')!r}: "
                           f"{exc.errors[0][1]}") from exc
        raise _as_written(openai_errors(InvalidJob(exc.errors), body), names) from exc
    headers = {"x-promptbatch-job-id": job_id}
    if body.get("stream"):
        options = body.get("stream_options") or {}
        stored = await run_in_threadpool(client.store.get, job_id)
        if stored is None:
            raise JobNotFound(job_id)  # removed since: a purge ran between
        until = wait_bound(stored.spec.deadline, time.time(),
                           request.app.state.settings.api_stream_max_s)
        return StreamingResponse(
            _chunks(request, stored, str(body.get("model")), chat,
                    bool(isinstance(options, dict) and options.get("include_usage")), until),
            media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    res = await _wait(request, job_id, keyed="idempotency_key" in item)
    created = int(res.created_at or time.time())
    model = str(body.get("model"))
    if res.state is not JobState.SUCCEEDED:
        status, kind = {JobState.EXPIRED: (504, "deadline_exceeded"),
                        JobState.CANCELLED: (409, "cancelled")}.get(
                            res.state, (502, "provider_error"))
        error = {"error": {"type": kind, "message": res.error or res.state.value,
                           "code": res.error_code or res.state.value.lower(),
                           "param": None, "job_id": job_id}}
        if chat and (res.text is not None or res.tool_calls):
            # An answer that never validated (invalid_output): kept beside the error as
            # the provider wrote it, as a Batch API error line keeps it.
            error = {**answer.completion(res, model, created), **error}
        return JSONResponse(error, status_code=status,
                            headers={**headers, "x-should-retry": "false"})
    extra = {"promptbatch": {"job_id": job_id, "cache": res.cache,
                             "batch_size": res.batch_size}}
    if chat:
        return JSONResponse({**answer.completion(res, model, created), **extra},
                            headers=headers)
    choice = {"index": 0, "finish_reason": answer.finish_reason(res),
              "logprobs": None, "text": res.text or ""}
    return JSONResponse({"id": "cmpl-" + job_id, "object": "text_completion",
                         "created": created, "model": model, "choices": [choice],
                         "usage": answer.usage(res), "system_fingerprint": None, **extra},
                        headers=headers)


async def _wait(request: Request, job_id: str, *, keyed: bool) -> JobResult:
    """Wait for the job's final result (it ends by its deadline, or by the longest wait
    the API allows: then 504 with the job's id, which keeps running). A caller that goes
    away before the job started cancels it (``_gone``). A result that
    left Redis is read from the store: at once when the call carried an idempotency key
    (it may be a repeat of a call long done), else every ``STORE_CHECK_S``."""
    client = client_of(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.app.state.settings.api_max_wait_s
    delay = 0.002
    checked = loop.time()
    in_store = None if keyed else loop.time()  # when the store was last asked
    while True:
        res = (await run_in_threadpool(client.queue.results, [job_id]))[0]
        if res is not None:
            return res
        if Cursor.store_due(in_store, loop.time()):  # a result that left Redis
            in_store = loop.time()
            res = await stored_result(client, job_id)
            if res is not None:
                return res
        if loop.time() - checked > 0.25:
            checked = loop.time()
            if await request.is_disconnected():
                _gone(request, job_id, keyed=keyed)
                raise ApiError(499, "client_closed_request", "the caller went away")
        if loop.time() >= deadline:  # not to be sent again: that would be a second job
            raise ApiError(504, "timeout", f"job {job_id} did not finish within the API's "
                           "longest wait (PROMPTBATCH_API_MAX_WAIT_S); it keeps running: "
                           f"GET /v1/jobs/{job_id}/result",
                           headers={"x-promptbatch-job-id": job_id, "x-should-retry": "false"})
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def _gone(request: Request, job_id: str, *, keyed: bool) -> None:
    """The caller went away: cancel its job if it has not started (in the background:
    this runs while the request is being torn down), unless the call carried an
    idempotency key: its caller will come back for the job (the SDK's retry after a
    timeout sends the key again), and a cancelled job would answer every retry 409."""
    if request.app.state.settings.api_cancel_on_disconnect and not keyed:
        client = client_of(request)
        asyncio.get_running_loop().run_in_executor(None, client.cancel, job_id)


async def _chunks(request: Request, stored: StoredJob, model: str, chat: bool,
                  include_usage: bool, until: float) -> AsyncIterator[str]:
    """OpenAI's stream of chunks, from the job's stream, then ``[DONE]`` (the chat
    chunks: ``producers.openai_answer``)."""
    job_id = stored.spec.id
    kind = answer.ChunkStream if chat else answer.TextChunkStream
    stream = kind(job_id, model, int(time.time()))

    def data(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    done = False
    sent = 0
    held = _held(stored)
    try:
        yield data(stream.start())
        async for event in follow(aio(request), job_id, until=until,
                                  settled=settled_in(client_of(request), stored)):
            if event.kind == "chunk" and held:
                continue  # sent whole once valid (``_held``)
            if event.kind == "chunk":
                sent += len(event.text)
                yield data(stream.content(event.text))
                continue
            if event.kind in ("attempt", "lost") and not sent:
                continue  # nothing sent yet: nothing to take back
            done = True
            if event.kind != "end":
                yield _stopped(job_id, event.kind)
                return
            res = await stored_result(client_of(request), job_id)
            if res is None or res.state is not JobState.SUCCEEDED:
                state = res.state.value if res else event.text
                yield _error_event(job_id, state.lower(), (res.error if res else None) or state)
                return
            # The content when none was streamed (the cache), tool calls, the end.
            for part in stream.rest(res, content=not sent):
                yield data(part)
            if include_usage:
                yield data(stream.usage(res))
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:
            _gone(request, job_id, keyed=stored.spec.idempotency_key is not None)


def _held(stored: StoredJob) -> bool:
    """Whether the job's streamed text is held back and its content sent whole at the end:
    an answer the worker checks (a JSON response format, or a tool call asked for) may be
    asked again after its first text streamed (``workers.promise``), and OpenAI's stream
    cannot take text back (the SDK's ``stream()`` helper parses JSON content as it comes,
    so text that is not the final JSON breaks it)."""
    spec = stored.spec
    forced = bool(spec.tools) and spec.tool_choice not in (None, "auto", "none")
    return forced or (spec.response_format is not None and spec.response_format.wants_json)


def _stopped(job_id: str, kind: str) -> str:
    """The error event of a stream that stops before the job's end: its wait bound passed
    (the job keeps running), or the provider call restarted after text was sent (what was
    sent cannot be taken back in this format)."""
    if kind == "timeout":
        return _error_event(job_id, "timeout", f"job {job_id} did not finish within the "
                            "stream's wait bound (its deadline, else "
                            "PROMPTBATCH_API_STREAM_MAX_S); it keeps running: "
                            f"GET /v1/jobs/{job_id}/result")
    return _error_event(job_id, "stream_restarted", "the provider call was restarted after "
                        "part of the answer was sent; the whole answer will be at "
                        f"GET /v1/jobs/{job_id}/result")


def _error_event(job_id: str, code: str, message: str) -> str:
    error = {"error": {"type": "job_error", "code": code, "message": message, "param": None,
                       "job_id": job_id}}
    return f"data: {json.dumps(error)}\n\n"


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(request: Request, caller: CallerDep) -> Response:
    """OpenAI's chat completion, as a job of the caller's tenant (waits for its result)."""
    return await _call(request, caller, chat=True)


@router.post("/v1/completions", tags=["openai"])
async def completions(request: Request, caller: CallerDep) -> Response:
    """OpenAI's (legacy) completion of one prompt, as a job."""
    return await _call(request, caller, chat=False)

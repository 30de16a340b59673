"""Serving a job's stream (``jobs.streams``) over HTTP: ``GET /v1/jobs/{id}/stream`` as
server-sent events, resumable with ``Last-Event-ID``; and the asynchronous reader the
OpenAI-compatible endpoint streams from. Reads block in Redis (``XREAD BLOCK``) on the
API's asynchronous Redis client, so a waiting reader holds no thread; a slow reader
never holds a worker: the worker only appends, and a reader that falls behind the
stream's bound is told so (``lost``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from config import keys
from jobs.errors import JobNotFound
from jobs.models import JobResult
from jobs.queue import aconnect
from jobs.store import StoredJob
from jobs.streams import READ_COUNT, Cursor, Event, entry_id, older
from producers.auth import CallerDep, TenantQuery
from producers.client import Client
from producers.web import ApiError, client_of, settings_of

router = APIRouter()


def aio(request: Request) -> aioredis.Redis:
    """The API's asynchronous Redis client (created on first use)."""
    state = request.app.state
    if getattr(state, "aioredis", None) is None:
        state.aioredis = aconnect(state.settings.redis_url)
    return state.aioredis  # type: ignore[no-any-return]


async def follow(r: aioredis.Redis, job_id: str, after: str = "0-0", *,
                 until: float | None = None,
                 settled: Callable[[], Awaitable[str | None]] | None = None,
                 ) -> AsyncIterator[Event]:
    """``jobs.streams.follow`` on the asynchronous client: the job's events after
    ``after`` until its ``end`` (from its result when the stream has none; from the
    store's state, ``settled``, when Redis holds no result), or a ``timeout`` event once
    ``until`` (Unix time) has passed."""
    name = keys.job_stream(job_id)
    cursor, lost = await _resume(r, name, after)
    if lost is not None:
        yield lost
    final: str | None = None  # the result, once stored: then drain what is left, and end
    state = ""  # the final state the store holds, when Redis has no result
    got = True
    checked: float | None = None
    while True:
        now = time.time()
        if final is None and Cursor.timed_out(until, now, got):
            yield Event(cursor.after, "timeout")
            return
        # The first read does not wait: a job long finished ends without a pause.
        block = None if final is not None or checked is None else Cursor.block_ms(until, now)
        reply: Any = await r.xread({name: cursor.after}, count=READ_COUNT, block=block)
        entries = [entry for _, batch in reply or [] for entry in batch]
        got = bool(entries)
        for event in cursor.take(entries):
            yield event
        if cursor.ended:
            return
        if got:
            continue
        if final is not None:
            yield cursor.ending(final) if not state else cursor.ended_as(state)
            return
        raw: Any = await r.get(keys.celery_result(job_id))
        if raw is not None:  # every chunk was written before the result: read the rest
            final = str(raw)
        elif Cursor.store_due(checked, now):
            checked = now
            state = (await settled() if settled is not None else None) or ""
            if state:  # final in the store, so every chunk is in the stream: drain, end
                final = ""
        if checked is None:
            checked = now


async def stored_result(client: Client, job_id: str) -> JobResult | None:
    """The job's result: the one in Redis, else the store's (a result that left Redis)."""
    res = (await run_in_threadpool(client.queue.results, [job_id]))[0]
    if res is None:
        raw = (await run_in_threadpool(client.store.outcomes, [job_id])).get(job_id)
        res = JobResult.model_validate_json(raw) if raw else None
    return res


async def _resume(r: aioredis.Redis, name: str, after: str) -> tuple[Cursor, Event | None]:
    """The cursor of a reader resuming after ``after``, and a ``lost`` event when the
    entries after it were trimmed away (it then reads from the oldest entry kept)."""
    if after == "0-0":
        return Cursor(), None
    first: Any = await r.xrange(name, count=1)
    at: Any = await r.xrange(name, min=after, max=after, count=1)
    if first and older(after, str(first[0][0])) and not at:
        return Cursor(), Event(after, "lost")
    return Cursor(after, Cursor.attempt_of(at[0][1] if at else None)), None


def settled_in(client: Client, stored: StoredJob) -> Callable[[], Awaitable[str | None]]:
    """The store's answer to ``follow``: the job's state once its result is stored. The
    first answer is ``stored``'s (just read by the caller: no query on a stream's way to
    its first chunk); later ones ask the store."""
    asked = False

    async def state() -> str | None:
        nonlocal asked
        if not asked:
            asked = True
            return stored.state.value if stored.state.final else None
        try:
            raw = (await run_in_threadpool(client.store.outcomes, [stored.spec.id])).get(
                stored.spec.id)
        except (SQLAlchemyError, TimeoutError):  # the store is down: Redis may still end it
            return None
        return JobResult.model_validate_json(raw).state.value if raw else None
    return state


def resume_point(last_event_id: str | None) -> str:
    """Where a reader resumes: after ``Last-Event-ID`` (400 if it is not an event id this
    API gave out), else from the start."""
    if last_event_id is None or not last_event_id.strip():
        return "0-0"
    after = entry_id(last_event_id)
    if after is None:
        raise ApiError(400, "invalid_request_error", "Last-Event-ID must be the id of an "
                       "event this stream sent (like 1733140000000-0)",
                       [{"field": "Last-Event-ID", "message": "not an event id"}])
    return after


def wait_bound(deadline: float | None, now: float, max_s: float) -> float:
    """Until when a streamed response waits for its job: the job's deadline, else
    ``max_s`` from now (and never longer than that)."""
    bound = now + max_s
    return bound if deadline is None else min(bound, deadline)


def sse(event: Event) -> str:
    """One server-sent event: its stream id, kind and JSON data."""
    data = {"chunk": {"text": event.text},
            "attempt": {"attempt": event.text, "discard": "the text of earlier attempts"},
            "end": {"state": event.text},
            "lost": {"message": "the reader fell behind the stream's bound; the whole "
                                "text is in the result"},
            "timeout": {"message": "the job did not finish within the stream's time "
                                   "bound; it keeps running: read its result, or resume "
                                   "with Last-Event-ID"}}[event.kind]
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(data)}\n\n"


@router.get("/v1/jobs/{job_id}/stream", tags=["jobs"])
async def stream_job(job_id: str, request: Request, caller: CallerDep,
                     last_event_id: Annotated[str | None, Header()] = None,
                     tenant: TenantQuery = None) -> StreamingResponse:
    """A streaming job's output as server-sent events (``chunk``, ``attempt``: discard
    the text before it, ``end``); resume with ``Last-Event-ID``."""
    after = resume_point(last_event_id)
    stored = await run_in_threadpool(client_of(request).store.find, job_id,
                                     caller.scope_to(tenant))
    if stored is None:
        raise JobNotFound(job_id)
    real_id = stored.spec.id
    until = wait_bound(stored.spec.deadline, time.time(),
                       settings_of(request).api_stream_max_s)

    async def events() -> AsyncIterator[str]:
        async for event in follow(aio(request), real_id, after, until=until,
                                  settled=settled_in(client_of(request), stored)):
            yield sse(event)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})

"""Serving a job's stream (``jobs.streams``) over HTTP: ``GET /v1/jobs/{id}/stream`` as
server-sent events, resumable with ``Last-Event-ID``; and the asynchronous reader the
OpenAI-compatible endpoint streams from. Reads block in Redis (``XREAD BLOCK``) on the
API's asynchronous Redis client, so a waiting reader holds no thread; a slow reader
never holds a worker: the worker only appends, and a reader that falls behind the
stream's bound is told so (``lost``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from config import keys
from jobs.errors import JobNotFound
from jobs.streams import Event, event_of, final_state, older
from producers.auth import CallerDep
from producers.web import client_of

router = APIRouter()

#: How long one read waits in Redis, in milliseconds.
BLOCK_MS = 1000


def aio(request: Request) -> aioredis.Redis:
    """The API's asynchronous Redis client (created on first use)."""
    state = request.app.state
    if getattr(state, "aioredis", None) is None:
        state.aioredis = aioredis.Redis.from_url(state.settings.redis_url,
                                                 decode_responses=True)
    return state.aioredis  # type: ignore[no-any-return]


async def follow(r: aioredis.Redis, job_id: str, after: str = "0-0") -> AsyncIterator[Event]:
    """The job's events after ``after`` until its ``end`` (or, for a job that ended with
    no stream, an ``end`` with its state from the result)."""
    name = keys.job_stream(job_id)
    if after != "0-0":  # resuming: were the entries after ``after`` trimmed away?
        first: Any = await r.xrange(name, count=1)
        if first and older(after, str(first[0][0])) and not await r.xrange(
                name, min=after, max=after, count=1):
            yield Event(after, "lost")
            after = "0-0"
    while True:
        reply: Any = await r.xread({name: after}, count=500, block=BLOCK_MS)
        got = False
        for _, entries in reply or []:
            for entry_id, fields in entries:
                got = True
                event = event_of(str(entry_id), fields)
                after = event.id
                yield event
                if event.kind == "end":
                    return
        if not got:
            raw: Any = await r.get(keys.celery_result(job_id))
            if raw is not None and not await r.exists(name):
                yield Event(after, "end", final_state(raw))
                return


def sse(event: Event) -> str:
    """One server-sent event: its stream id, kind and JSON data."""
    data = {"chunk": {"text": event.text},
            "attempt": {"attempt": event.text, "discard": "the text of earlier attempts"},
            "end": {"state": event.text},
            "lost": {"message": "the reader fell behind the stream's bound; the whole "
                                "text is in the result"}}[event.kind]
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(data)}\n\n"


@router.get("/v1/jobs/{job_id}/stream", tags=["jobs"])
async def stream_job(job_id: str, request: Request, caller: CallerDep,
                     last_event_id: Annotated[str | None, Header()] = None,
                     ) -> StreamingResponse:
    """A streaming job's output as server-sent events (``chunk``, ``attempt``: discard
    the text before it, ``end``); resume with ``Last-Event-ID``."""
    stored = await run_in_threadpool(client_of(request).store.find, job_id, caller.scope)
    if stored is None:
        raise JobNotFound(job_id)
    real_id = stored.spec.id
    after = last_event_id if last_event_id and "-" in last_event_id else "0-0"

    async def events() -> AsyncIterator[str]:
        async for event in follow(aio(request), real_id, after):
            yield sse(event)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})

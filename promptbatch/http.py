"""The HTTP SDK: a service submits prompts and reads results with a tenant's API key, no
Redis or SQL credentials.

    from promptbatch.http import Client, AsyncClient

    with Client("http://127.0.0.1:8000", api_key) as pb:     # or PROMPTBATCH_URL, _API_KEY
        job_id = pb.submit("Summarise: ...", priority="high", timeout_s=30)
        print(pb.result(job_id, timeout=60).text)

    async with AsyncClient() as pb:
        ids = await pb.submit_many({"prompt": p} for p in prompts)
        async for result in pb.results(ids):
            ...

Every operation is written once, as a plan of HTTP requests (``_Plan``: a generator that
yields each request and is sent its response), and run by the synchronous or the
asynchronous driver. 429, 502, 503 and 504 and dropped connections are tried again,
honouring ``Retry-After``, at most ``max_retries`` times, for requests that are safe to
repeat (reads, and submits, whose jobs always carry an idempotency key); other errors
raise ``ApiError`` with the API's error body. A stream resumes after a dropped connection
from the last event it delivered (``Last-Event-ID``), so no chunk is lost or repeated;
``max_retries`` bounds the drops in a row without an event.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from jobs.chat import as_response_format
from jobs.models import JobRequest, JobResult

#: Jobs per ``POST /v1/jobs`` of ``submit_many`` (the API takes up to 10,000).
CHUNK = 1000
#: Ids per ``POST /v1/jobs/results``.
RESULTS_PER_CALL = 1000
#: The longest a single long poll asks the API to wait (it caps it at ``api_max_wait_s``).
POLL_S = 20.0
#: Statuses tried again (with Retry-After when the API gives it).
RETRYABLE = frozenset({429, 502, 503, 504})

T = TypeVar("T")


class ApiError(Exception):
    """The API refused a request (or could not be reached). ``status`` (0: unreachable),
    ``body`` (the API's error JSON), ``type``, ``message`` and ``errors`` (per field)."""

    def __init__(self, status: int, body: Mapping[str, Any] | None, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.body = dict(body or {})
        err = self.body.get("error", {}) if isinstance(self.body.get("error"), dict) else {}
        self.type: str = str(err.get("type", ""))
        self.message = str(err.get("message", message))
        self.errors: list[dict[str, Any]] = list(err.get("errors", []))


class ResultTimeout(TimeoutError):
    """The job(s) did not finish within the time asked for."""


class JobView(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` shows it (the API's ``job_view``)."""

    id: str
    object: str = "job"
    state: str
    priority: str | None = None
    tenant: str | None = None
    provider: str | None = None
    model: str | None = None
    created_at: float | None = None
    deadline: float | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = {}
    result: JobResult | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a job's stream: ``chunk`` (``text``), ``attempt`` (discard the text
    before it), ``end`` (``text`` is the final state), ``lost`` or ``timeout``."""

    id: str
    kind: str
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    timeout: float | None = None
    #: Error statuses the plan reads itself instead of raising ``ApiError``.
    answers: frozenset[int] = frozenset()


_Plan = Generator[_Request, httpx.Response, T]


def _job_body(prompt: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    if prompt is not None:
        fields["prompt"] = prompt
    return _jsonable(fields)


def _jsonable(item: JobRequest | Mapping[str, Any]) -> dict[str, Any]:
    """A job as the API takes it: a ``JobRequest``, or fields as ``JobRequest`` names them,
    whose values may be our types (``Message``, ``Tool``, ``ResponseFormat``...), a
    pydantic model class as ``response_format`` (its JSON Schema), or datetimes."""
    if isinstance(item, JobRequest):
        return item.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    fields = dict(item)
    if "response_format" in fields:
        fields["response_format"] = as_response_format(fields["response_format"])
    body: dict[str, Any] = json.loads(json.dumps(fields, default=_plain))
    return body


def _plain(value: Any) -> Any:
    """A value ``json`` cannot write: a pydantic model as its JSON (by alias, unset fields
    left out), anything else (dates) as text."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    return str(value)


def _error(resp: httpx.Response) -> ApiError:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    detail = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        detail = "; ".join(f"{e.get('field')}: {e.get('message')}"
                           for e in err.get("errors", [])) or str(err.get("message", ""))
    return ApiError(resp.status_code, body if isinstance(body, dict) else {},
                    detail or resp.text[:300] or resp.reason_phrase)


def _retry_after(resp: httpx.Response | None, attempt: int) -> float:
    if resp is not None:
        try:
            after = float(str(resp.headers.get("retry-after", "")))
            return min(60.0, max(0.0, after))
        except ValueError:
            pass
    return min(8.0, 0.25 * 2.0 ** attempt)


class _Plans:
    """The operations, as plans of requests (shared by both clients)."""

    @staticmethod
    def submit(body: dict[str, Any], key: str) -> _Plan[str]:
        resp = yield _Request("POST", "/v1/jobs", json=body,
                              headers={"Idempotency-Key": key})
        return str(resp.json()["id"])

    @staticmethod
    def submit_chunk(jobs: list[dict[str, Any]]) -> _Plan[list[str]]:
        """One ``POST /v1/jobs`` of the chunk; a chunk over the API's body limit (413, as
        a few jobs with images can be) is sent again in halves, in order (every job
        carries its idempotency key, so a part accepted before is accepted once)."""
        parts, ids = [jobs], []
        while parts:
            part = parts.pop(0)
            resp = yield _Request("POST", "/v1/jobs", json={"jobs": part},
                                  answers=frozenset({413}) if len(part) > 1 else frozenset())
            if resp.status_code == 413:
                half = len(part) // 2
                parts[:0] = [part[:half], part[half:]]
                continue
            ids += [str(i) for i in resp.json()["ids"]]
        return ids

    @staticmethod
    def get(job_id: str) -> _Plan[JobView]:
        resp = yield _Request("GET", f"/v1/jobs/{job_id}")
        return JobView.model_validate(resp.json())

    @staticmethod
    def result(job_id: str, timeout: float | None) -> _Plan[JobResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_S if deadline is None else max(0.0, deadline - time.monotonic())
            wait = min(POLL_S, left)
            resp = yield _Request("GET", f"/v1/jobs/{job_id}/result",
                                  params={"wait": round(wait, 3)}, timeout=wait + 30)
            if resp.status_code == 200:
                return JobResult.model_validate(resp.json())
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"job {job_id} did not finish within {timeout} s")

    @staticmethod
    def results_once(ids: list[str], wait: float) -> _Plan[tuple[list[JobResult], list[str]]]:
        resp = yield _Request("POST", "/v1/jobs/results", json={"ids": ids, "wait": wait},
                              timeout=wait + 30)
        body = resp.json()
        return [JobResult.model_validate(d) for d in body["data"]], list(body["unknown"])

    @staticmethod
    def cancel(job_id: str) -> _Plan[str]:
        resp = yield _Request("DELETE", f"/v1/jobs/{job_id}")
        body = resp.json()
        if resp.status_code == 409 and isinstance(body.get("error"), dict):
            body = body["error"]  # too late: the error carries the job's state
        return str(body["state"])

    @staticmethod
    def page(state: str | None, limit: int, cursor: str | None,
             ) -> _Plan[tuple[list[JobView], str | None]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if cursor:
            params["cursor"] = cursor
        resp = yield _Request("GET", "/v1/jobs", params=params)
        body = resp.json()
        return [JobView.model_validate(j) for j in body["data"]], body.get("next_cursor")


class _SSE:
    """Server-sent events, parsed line by line."""

    def __init__(self) -> None:
        self._id = ""
        self._kind = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._kind and not self._data:
                return None
            raw = "\n".join(self._data)
            self._kind, self._data, kind = "", [], self._kind or "message"
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {"raw": raw}
            text = str(data.get("text", data.get("state", data.get("attempt", ""))))
            return Event(self._id, kind, text, data)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        return None


_FINAL_EVENTS = frozenset({"end", "timeout", "lost"})


class _Base:
    def __init__(self, url: str | None, api_key: str | None, timeout: float,
                 max_retries: int) -> None:
        url = url or os.environ.get("PROMPTBATCH_URL", "")
        key = api_key or os.environ.get("PROMPTBATCH_API_KEY", "")
        if not url:
            raise ValueError("no API URL: pass url= or set PROMPTBATCH_URL (`promptbatch up` "
                             "writes it to up.env)")
        if not key:
            raise ValueError("no API key: pass api_key= or set PROMPTBATCH_API_KEY")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self._headers = {"Authorization": f"Bearer {key}"}

    def _kwargs(self, req: _Request) -> dict[str, Any]:
        return {"json": req.json, "params": req.params, "headers": req.headers,
                "timeout": req.timeout or self.timeout}

    def _verdict(self, req: _Request, resp: httpx.Response | None,
                 error: httpx.TransportError | None, attempt: int) -> float | None:
        """After one try of ``req`` (its response, or the error that cut it): None when
        the response is the answer, else the seconds to wait before the next try. Raises
        ``ApiError`` when there is to be none (every request here is safe to repeat:
        reads, cancels, and submits that carry an idempotency key)."""
        if resp is not None and (resp.status_code < 400 or resp.status_code in req.answers or (
                resp.status_code == 409 and req.method == "DELETE")):  # a late cancel: its state
            return None
        if attempt < self.max_retries and (resp is None or resp.status_code in RETRYABLE):
            return _retry_after(resp, attempt)
        if resp is None:
            raise ApiError(0, None, f"cannot reach the API at {self.url}: {error}") from error
        raise _error(resp)

    def _stream_pause(self, job_id: str, resp: httpx.Response | None,
                      error: httpx.TransportError | None, attempt: int,
                      after: str | None) -> float:
        """A stream refused (``resp``, read) or dropped (``error``; or closed before its
        end) ``attempt + 1`` times in a row without an event: the seconds to wait before
        resuming it, or ``ApiError`` once that is more than ``max_retries``."""
        if resp is not None:
            if resp.status_code in RETRYABLE and attempt < self.max_retries:
                return _retry_after(resp, attempt)
            raise _error(resp)
        if attempt >= self.max_retries:
            how = f"dropped ({error})" if error is not None else "closed before its end"
            resume = f"; resume with last_event_id={after!r}" if after else ""
            raise ApiError(0, None, f"the stream of {job_id} {how} {attempt + 1} times in a "
                           f"row without an event{resume}") from error
        return _retry_after(None, attempt)


class Client(_Base):
    """The synchronous client (``httpx.Client``)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, max_retries: int = 5,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key, timeout, max_retries)
        self.http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout,
                                 transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _run(self, plan: _Plan[T]) -> T:
        try:
            step = next(plan)
            while True:
                step = plan.send(self._send(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _send(self, req: _Request) -> httpx.Response:
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            error: httpx.TransportError | None = None
            try:
                resp = self.http.request(req.method, req.path, **self._kwargs(req))
            except httpx.TransportError as exc:
                error = exc
            pause = self._verdict(req, resp, error, attempt)
            if pause is None:
                assert resp is not None
                return resp
            time.sleep(pause)
            attempt += 1

    def submit(self, prompt: str | None = None, *, idempotency_key: str | None = None,
               **fields: Any) -> str:
        """Submit one job; its id. Fields as in ``JobRequest`` (``messages`` with content
        parts and tool calls, ``tools``, ``response_format``..., as dictionaries or our
        types: ``Message``, ``Tool``, ``ResponseFormat``); ``response_format`` may also be
        a pydantic model class (a ``json_schema`` format of its schema)."""
        return self._run(_Plans.submit(_job_body(prompt, fields),
                                       idempotency_key or uuid.uuid4().hex))

    def submit_many(self, items: Iterable[JobRequest | Mapping[str, Any]], *,
                    idempotency_key: str | None = None, chunk: int = CHUNK) -> list[str]:
        """Submit many jobs, ``chunk`` per request; their ids in input order. Each job
        that has no idempotency key of its own gets one from its position in the whole
        call (``item_key``), whatever the chunk size: a chunk sent again (a retry), or the
        same call made again with the same key after an interruption, is accepted once."""
        base = idempotency_key or uuid.uuid4().hex
        ids: list[str] = []
        for part in _chunks(items, chunk, base):
            ids += self._run(_Plans.submit_chunk(part))
        return ids

    def get(self, job_id: str) -> JobView:
        """A job's state, and its result once final."""
        return self._run(_Plans.get(job_id))

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait (long-polling) for the job's result; ``ResultTimeout`` after ``timeout``."""
        return self._run(_Plans.result(job_id, timeout))

    def poll_results(self, job_ids: list[str], wait: float = 0.0,
                     ) -> tuple[list[JobResult], list[str]]:
        """One long poll of ``POST /v1/jobs/results``: the final ones' results (as soon
        as one is, or after ``wait``), and the ids this key has no job of."""
        return self._run(_Plans.results_once(job_ids, wait))

    def results(self, job_ids: Iterable[str], timeout: float | None = None,
                ) -> Iterator[JobResult]:
        """The jobs' results as they finish (any order); ``ResultTimeout`` after
        ``timeout`` with some still pending."""
        pending = list(dict.fromkeys(job_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            wait = _wait_left(deadline)
            found, unknown = self._run(_Plans.results_once(pending[:RESULTS_PER_CALL], wait))
            if unknown:
                raise ApiError(404, None, f"this key has no job {unknown[0]}")
            done = {r.id for r in found}
            pending = [i for i in pending if i not in done]
            yield from found
            if pending and deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"{len(pending)} job(s) did not finish within {timeout} s")

    def stream(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's stream of events, until ``end`` (or ``timeout``/``lost``); resumed
        after a dropped connection from the last event delivered. Drops are counted in a
        row: a connection that delivered an event starts the count again, and after
        ``max_retries`` more without one (dropped, or closed before the stream's end) it
        raises ``ApiError``."""
        after = last_event_id
        attempt = 0
        while True:
            headers = {"Last-Event-ID": after} if after else {}
            parser = _SSE()
            refused: httpx.Response | None = None
            error: httpx.TransportError | None = None
            start = after
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/stream", headers=headers,
                                      timeout=httpx.Timeout(self.timeout, read=None)) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        refused = resp
                    else:
                        for line in resp.iter_lines():
                            event = parser.feed(line)
                            if event is None:
                                continue
                            after = event.id or after
                            yield event
                            if event.kind in _FINAL_EVENTS:
                                return
            except httpx.TransportError as exc:
                error = exc
            attempt = 0 if after != start else attempt  # it moved on: a new count
            time.sleep(self._stream_pause(job_id, refused, error, attempt, after))
            attempt += 1

    def cancel(self, job_id: str) -> str:
        """Cancel a job that has not started; its state (CANCELLED, or what it is if too
        late)."""
        return self._run(_Plans.cancel(job_id))

    def list(self, state: str | None = None, page_size: int = 100) -> Iterator[JobView]:
        """The key's jobs, oldest first, page after page."""
        cursor: str | None = None
        while True:
            jobs, cursor = self._run(_Plans.page(state, page_size, cursor))
            yield from jobs
            if not cursor:
                return


class AsyncClient(_Base):
    """The asyncio client (``httpx.AsyncClient``): the same operations, awaited."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, max_retries: int = 5,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key, timeout, max_retries)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                      timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _run(self, plan: _Plan[T]) -> T:
        try:
            step = next(plan)
            while True:
                step = plan.send(await self._send(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _send(self, req: _Request) -> httpx.Response:
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            error: httpx.TransportError | None = None
            try:
                resp = await self.http.request(req.method, req.path, **self._kwargs(req))
            except httpx.TransportError as exc:
                error = exc
            pause = self._verdict(req, resp, error, attempt)
            if pause is None:
                assert resp is not None
                return resp
            await asyncio.sleep(pause)
            attempt += 1

    async def submit(self, prompt: str | None = None, *, idempotency_key: str | None = None,
                     **fields: Any) -> str:
        """``Client.submit``."""
        return await self._run(_Plans.submit(_job_body(prompt, fields),
                                             idempotency_key or uuid.uuid4().hex))

    async def submit_many(self, items: Iterable[JobRequest | Mapping[str, Any]], *,
                          idempotency_key: str | None = None, chunk: int = CHUNK) -> list[str]:
        """``Client.submit_many``."""
        base = idempotency_key or uuid.uuid4().hex
        ids: list[str] = []
        for part in _chunks(items, chunk, base):
            ids += await self._run(_Plans.submit_chunk(part))
        return ids

    async def get(self, job_id: str) -> JobView:
        """``Client.get``."""
        return await self._run(_Plans.get(job_id))

    async def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """``Client.result``."""
        return await self._run(_Plans.result(job_id, timeout))

    async def results(self, job_ids: Iterable[str], timeout: float | None = None,
                      ) -> AsyncIterator[JobResult]:
        """``Client.results``."""
        pending = list(dict.fromkeys(job_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            wait = _wait_left(deadline)
            found, unknown = await self._run(
                _Plans.results_once(pending[:RESULTS_PER_CALL], wait))
            if unknown:
                raise ApiError(404, None, f"this key has no job {unknown[0]}")
            done = {r.id for r in found}
            pending = [i for i in pending if i not in done]
            for res in found:
                yield res
            if pending and deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"{len(pending)} job(s) did not finish within {timeout} s")

    async def stream(self, job_id: str, last_event_id: str | None = None,
                     ) -> AsyncIterator[Event]:
        """``Client.stream``."""
        after = last_event_id
        attempt = 0
        while True:
            headers = {"Last-Event-ID": after} if after else {}
            parser = _SSE()
            refused: httpx.Response | None = None
            error: httpx.TransportError | None = None
            start = after
            try:
                async with self.http.stream("GET", f"/v1/jobs/{job_id}/stream",
                                            headers=headers,
                                            timeout=httpx.Timeout(self.timeout, read=None),
                                            ) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        refused = resp
                    else:
                        async for line in resp.aiter_lines():
                            event = parser.feed(line)
                            if event is None:
                                continue
                            after = event.id or after
                            yield event
                            if event.kind in _FINAL_EVENTS:
                                return
            except httpx.TransportError as exc:
                error = exc
            attempt = 0 if after != start else attempt  # it moved on: a new count
            await asyncio.sleep(self._stream_pause(job_id, refused, error, attempt, after))
            attempt += 1

    async def cancel(self, job_id: str) -> str:
        """``Client.cancel``."""
        return await self._run(_Plans.cancel(job_id))

    async def list(self, state: str | None = None, page_size: int = 100,
                   ) -> AsyncIterator[JobView]:
        """``Client.list``."""
        cursor: str | None = None
        while True:
            jobs, cursor = await self._run(_Plans.page(state, page_size, cursor))
            for job in jobs:
                yield job
            if not cursor:
                return


def item_key(base: str, position: int) -> str:
    """The idempotency key ``submit_many`` gives the job at ``position`` (0-based) of a
    call made with key ``base``: ``{base}:{position // CHUNK}:{position % CHUNK}``, the
    key the API gave each job when this SDK sent chunks of ``CHUNK`` under the key
    ``{base}:{n}`` (so a call interrupted under that scheme resumes without a copy)."""
    return f"{base}:{position // CHUNK}:{position % CHUNK}"


def _chunks(items: Iterable[JobRequest | Mapping[str, Any]], size: int,
            base: str) -> Iterator[list[dict[str, Any]]]:
    """The jobs in lists of ``size``, each keyed by its position in the whole call."""
    if size < 1:
        raise ValueError(f"chunk must be 1 or more, not {size}")
    part: list[dict[str, Any]] = []
    for position, item in enumerate(items):
        job = _jsonable(item)
        if not job.get("idempotency_key"):
            job["idempotency_key"] = item_key(base, position)
        part.append(job)
        if len(part) >= size:
            yield part
            part = []
    if part:
        yield part


def _wait_left(deadline: float | None) -> float:
    if deadline is None:
        return POLL_S
    return round(max(0.0, min(POLL_S, deadline - time.monotonic())), 3)

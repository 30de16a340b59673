"""What the HTTP providers share: the client, sending one request, classifying replies,
and sending a batch's requests in the order that lets the server's prefix cache work."""

from __future__ import annotations

import email.utils
import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from config.settings import Settings
from workers.providers.base import ProviderReply, ProviderRequest

__all__ = ["Gate", "Response", "SendError", "Strategy", "cache_key", "classify", "make_client",
           "not_json", "post", "retry_after_s", "run_ordered", "send", "shared_prefix"]

#: The raw body kept with an error, at most.
RAW_KEPT = 2000


class Strategy(StrEnum):
    """How a batch's requests go out, so that the server reuses their shared prefix."""

    SEQUENTIAL = "sequential"  #: one after another on one connection (per-slot caches)
    WARM_THEN_PARALLEL = "warm_then_parallel"  #: the first alone, then the rest at once
    PARALLEL = "parallel"  #: all at once


def make_client(settings: Settings, *, concurrency: int | None = None) -> httpx.Client:
    """A keep-alive client with our timeouts (no retries: ``workers.retry`` does that)."""
    n = concurrency or settings.provider_concurrency
    return httpx.Client(
        timeout=httpx.Timeout(connect=settings.provider_connect_timeout_s,
                              read=settings.provider_read_timeout_s,
                              write=settings.provider_read_timeout_s,
                              pool=settings.provider_total_timeout_s),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        transport=httpx.HTTPTransport(retries=0),
    )


def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, then ``Retry-After``
    (seconds or an HTTP date); None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (now if now is not None else time.time()))


@dataclass(frozen=True, slots=True)
class Response:
    """A finished HTTP exchange: status, headers and the whole body."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    @property
    def raw(self) -> str:
        return self.body[:RAW_KEPT].decode("utf-8", "replace")


class SendError(Exception):
    """Raised when no complete response arrived (connect, read or total timeout, reset)."""


def send(client: httpx.Client, url: str, payload: dict[str, Any], headers: dict[str, str],
         total_timeout: float) -> Response:
    """POST JSON and read the whole body, within ``total_timeout`` seconds in all."""
    start = time.monotonic()
    try:
        with client.stream("POST", url, json=payload, headers=headers) as resp:
            chunks = []
            for chunk in resp.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() - start > total_timeout:
                    raise SendError(f"no complete response within {total_timeout:g} s")
            return Response(resp.status_code, resp.headers, b"".join(chunks))
    except httpx.TimeoutException as exc:
        raise SendError(f"timed out ({type(exc).__name__})") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise SendError(f"connection failed ({type(exc).__name__}: {exc})") from exc


def classify(job_id: str, resp: Response, *, context_markers: Sequence[str],
             ) -> ProviderReply | None:
    """A reply for an error status, or None for a 2xx (the caller parses it)."""
    if 200 <= resp.status < 300:
        return None
    raw = resp.raw
    if resp.status in (408, 409, 429, 529) or resp.status >= 500:
        return ProviderReply(job_id=job_id, transient=True, retry_after=retry_after_s(
            resp.headers), error=f"HTTP {resp.status}: {raw}")
    lowered = raw.lower()
    if any(marker in lowered for marker in context_markers):
        return ProviderReply(job_id=job_id, error=f"context too long (HTTP {resp.status}): {raw}")
    if resp.status in (401, 403):
        return ProviderReply(job_id=job_id, error=f"HTTP {resp.status}: the provider refused "
                             f"the API key; check the key setting: {raw}")
    return ProviderReply(job_id=job_id, error=f"HTTP {resp.status}: {raw}")


def post(client: httpx.Client, gate: Gate, url: str, payload: dict[str, Any],
         headers: dict[str, str], settings: Settings, job_id: str,
         context_markers: Sequence[str]) -> Response | ProviderReply:
    """Send one request; a 2xx ``Response`` to parse, or the reply for a failure."""
    try:
        with gate:
            resp = send(client, url, payload, headers, settings.provider_total_timeout_s)
    except SendError as exc:
        return ProviderReply(job_id=job_id, transient=True, error=str(exc))
    return classify(job_id, resp, context_markers=context_markers) or resp


def post_stream(client: httpx.Client, gate: Gate, url: str, payload: dict[str, Any],
                headers: dict[str, str], settings: Settings, job_id: str,
                context_markers: Sequence[str],
                on_data: Callable[[str, Any], None]) -> ProviderReply | None:
    """POST a streaming request and hand each server-sent event's JSON data to ``on_data``
    (with the event's name, '' if none) as it arrives, within the total timeout. None when
    the stream ended well; else the reply for the failure (classified as ``post`` does;
    a stream cut off or not JSON is transient)."""
    import json

    limit = settings.provider_total_timeout_s
    start = time.monotonic()
    try:
        with gate, client.stream("POST", url, json=payload, headers=headers) as resp:
            if not 200 <= resp.status_code < 300:
                failed = classify(job_id, Response(resp.status_code, resp.headers, resp.read()),
                                  context_markers=context_markers)
                return failed or ProviderReply(job_id=job_id, transient=True,
                                               error=f"HTTP {resp.status_code}")
            event = ""
            for line in resp.iter_lines():
                if time.monotonic() - start > limit:
                    return ProviderReply(job_id=job_id, transient=True,
                                         error=f"no complete response within {limit:g} s")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    on_data(event, json.loads(data))
    except httpx.TimeoutException as exc:
        return ProviderReply(job_id=job_id, transient=True,
                             error=f"timed out ({type(exc).__name__})")
    except (httpx.TransportError, httpx.DecodingError) as exc:
        return ProviderReply(job_id=job_id, transient=True,
                             error=f"connection failed ({type(exc).__name__}: {exc})")
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        return ProviderReply(job_id=job_id, transient=True,
                             error=f"the stream was cut off or is not JSON ({exc})")
    return None


def not_json(job_id: str, resp: Response, exc: Exception) -> ProviderReply:
    """A 2xx whose body is cut off or not JSON: a transport fault, retried like a 5xx."""
    return ProviderReply(job_id=job_id, transient=True,
                         error=f"the response was cut off or is not JSON ({exc}): {resp.raw}")


def shared_prefix(texts: Sequence[str], limit: int = 4096) -> str:
    """The prefix every text starts with (at most ``limit`` characters)."""
    if not texts:
        return ""
    return os.path.commonprefix([t[:limit] for t in texts])  # noqa: RUF071 (strings)


def cache_key(texts: Sequence[str], pending_prefix_chars: int = 0) -> str | None:
    """A ``prompt_cache_key`` for a batch: a hash of its shared prefix, or, for a request
    sent alone, of the prefix it shares with jobs still pending (None if short)."""
    if len(texts) == 1 and pending_prefix_chars:
        prefix = texts[0][:pending_prefix_chars]
    else:
        prefix = shared_prefix(texts)
    if len(prefix) < 64:
        return None
    return "pb-" + hashlib.sha256(prefix.encode()).hexdigest()[:32]


def run_ordered(requests: Sequence[ProviderRequest], strategy: Strategy, concurrency: int,
                one: Callable[[ProviderRequest], ProviderReply]) -> list[ProviderReply]:
    """Send the requests (already ordered so shared prefixes sit together) by strategy."""
    if not requests:
        return []
    if strategy is Strategy.SEQUENTIAL or concurrency == 1 or len(requests) == 1:
        return [one(r) for r in requests]
    replies: list[ProviderReply] = []
    rest = list(requests)
    if strategy is Strategy.WARM_THEN_PARALLEL:
        replies.append(one(rest.pop(0)))
    with ThreadPoolExecutor(max_workers=min(concurrency, len(rest))) as pool:
        replies += list(pool.map(one, rest))
    return replies


class Gate:
    """At most ``n`` requests in flight to one provider from this process."""

    def __init__(self, n: int) -> None:
        self._sem = threading.BoundedSemaphore(n)

    def __enter__(self) -> Gate:
        self._sem.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self._sem.release()

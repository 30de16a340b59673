"""What the providers' batch endpoints share (the half-price lane): the protocol of a
client, what a poll says, what a line of the results says, and how a provider batch's
requests are laid out so prompt caching works inside it.

A client (``openai_batch``, ``anthropic_batch``) is pure translation plus thin HTTP: it
builds the provider's request body from the same translation as the live call
(``to_openai``, ``AnthropicProvider.payloads``), reads each result line with the same
translation as a live answer (``from_openai``, ``from_anthropic``), and raises
``BatchAPIError`` for an HTTP failure, transient or not. It never retries: the lane's
worker tasks are sent again by the scheduler.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from typing import Any, Protocol

import httpx

from config.settings import Settings
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.http import retry_after_s

#: Characters of a prompt that make its prefix family (as the scheduler's pool has it):
#: requests of one family travel together and share one prompt-cache mark.
FAMILY_CHARS = 256


class BatchAPIError(Exception):
    """Raised when a provider's batch endpoint refuses a request or cannot be reached;
    ``transient``: trying again later may succeed (429, 5xx, timeouts, resets)."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Upstream:
    """A provider batch as the provider shows it."""

    id: str
    #: The provider's own status (OpenAI's ``status``, Anthropic's ``processing_status``).
    status: str
    #: Whether the provider is done with it (completed, failed, expired, cancelled, ended).
    ended: bool
    counts: dict[str, int] = field(default_factory=dict)
    #: Where its results are: OpenAI's output file id, Anthropic's ``results_url``.
    output: str | None = None
    #: OpenAI's error file id.
    errors: str | None = None
    #: Unix time it was created.
    created_at: float = 0.0
    #: How many requests it holds.
    total: int = 0
    #: Ours: the promptbatch id in its metadata (OpenAI), when it has one.
    ours: str | None = None
    #: Why the provider refused the batch as a whole (OpenAI's ``failed``), if it did.
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class LineResult:
    """One request's outcome in a provider batch's results, by its ``custom_id`` (the
    job's id): an answer or the job's own error (``reply``), or, with ``again``, no
    final outcome: the job runs on the fast path (a transient failure, an expired or
    cancelled request), ``why`` saying what happened."""

    job_id: str
    reply: ProviderReply | None = None
    again: bool = False
    why: str = ""


class BatchClient(Protocol):
    """A provider's batch endpoint."""

    provider: str

    def create(self, batch_id: str, requests: Sequence[ProviderRequest], *,
               input_file_id: str | None = None,
               on_file: Callable[[str], None] | None = None) -> str:
        """Create the provider batch of ``requests`` (custom ids: their job ids; ours,
        ``batch_id``, in its metadata where the provider keeps one); the provider's id.
        ``input_file_id``: an input file an earlier attempt uploaded; ``on_file``: told
        the id of a file this one uploads, before the batch is created."""
        ...

    def find(self, batch_id: str, total: int, since: float) -> list[str]:
        """The provider's ids of batches an earlier attempt may have created for
        ``batch_id`` without recording them (created at or after ``since``, holding
        ``total`` requests), newest first: by our id in their metadata where the provider
        keeps one (exact), else by time and size (candidates)."""
        ...

    def status(self, provider_id: str) -> Upstream:
        """What the provider says of the batch (one request)."""
        ...

    def results(self, upstream: Upstream, requests: Mapping[str, ProviderRequest],
                ) -> Iterator[LineResult]:
        """Every line of an ended batch's results (``requests``: the batch's requests by
        job id, for reading their answers back as the live call would)."""
        ...

    def cancel(self, provider_id: str) -> None:
        """Ask the provider to cancel the batch."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def families(requests: Sequence[ProviderRequest]) -> list[list[ProviderRequest]]:
    """The requests in prefix families (their first ``FAMILY_CHARS`` characters), in text
    order: a provider batch lists a family's requests together, each family marked for
    the provider's prompt cache as one group."""
    ordered = sorted(requests, key=lambda r: r.text)
    return [list(g) for _, g in groupby(ordered, key=lambda r: r.text[:FAMILY_CHARS])]


def raise_for(resp: httpx.Response, what: str) -> None:
    """``BatchAPIError`` for an error status (transient: 408, 409, 429, 529 and 5xx)."""
    if 200 <= resp.status_code < 300:
        return
    status = resp.status_code
    transient = status in (408, 409, 429, 529) or status >= 500
    hint = (" (check the provider's API key setting)" if status in (401, 403) else "")
    raise BatchAPIError(f"{what}: HTTP {status}{hint}: {resp.text[:500]}",
                        transient=transient, status=status,
                        retry_after=retry_after_s(resp.headers))


def request(client: httpx.Client, method: str, url: str, what: str,
            **kwargs: object) -> httpx.Response:
    """One HTTP request; ``BatchAPIError`` for a failure (a transport failure is
    transient)."""
    try:
        resp = client.request(method, url, **kwargs)  # type: ignore[arg-type]
    except (httpx.TimeoutException, httpx.TransportError, httpx.DecodingError) as exc:
        raise _unreached(what, exc) from exc
    raise_for(resp, what)
    return resp


def _unreached(what: str, exc: Exception) -> BatchAPIError:
    """A timeout or a lost connection, as a transient ``BatchAPIError``."""
    if isinstance(exc, httpx.TimeoutException):
        return BatchAPIError(f"{what}: timed out ({type(exc).__name__})", transient=True)
    return BatchAPIError(f"{what}: connection failed ({type(exc).__name__}: {exc})",
                         transient=True)


def stream_lines(client: httpx.Client, url: str, what: str,
                 headers: dict[str, str]) -> Iterator[Any]:
    """The JSON lines of a results file, read as they arrive (never held whole);
    ``BatchAPIError`` for a failure (transient for a cut-off line or a lost connection)."""
    try:
        with client.stream("GET", url, headers=headers) as resp:
            if not 200 <= resp.status_code < 300:
                resp.read()
                raise_for(resp, what)
            for raw in resp.iter_lines():
                if not raw.strip():
                    continue
                try:
                    yield json.loads(raw)
                except ValueError as exc:
                    raise BatchAPIError(f"{what}: a line is not JSON ({exc})",
                                        transient=True) from exc
    except (httpx.TimeoutException, httpx.TransportError, httpx.DecodingError) as exc:
        raise _unreached(what, exc) from exc


class HttpBatchClient:
    """What both clients share: one HTTP client (no retries of its own; a long write for
    an input file), the provider's headers, and ``_call`` for one JSON request."""

    def __init__(self, settings: Settings, base_url: str, headers: dict[str, str]) -> None:
        self.settings = settings
        self.base_url = base_url.split(",")[0].strip().rstrip("/")
        self._headers = headers
        self.client = httpx.Client(timeout=httpx.Timeout(
            settings.provider_read_timeout_s, connect=settings.provider_connect_timeout_s,
            write=max(600.0, settings.provider_total_timeout_s)),
            transport=httpx.HTTPTransport(retries=0))

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        resp = request(self.client, method, f"{self.base_url}{path}", what,
                       headers=self._headers, **kwargs)
        try:
            return resp.json()
        except ValueError as exc:
            raise BatchAPIError(f"{what}: the answer is not JSON: {resp.text[:300]}",
                                transient=True) from exc

    def close(self) -> None:
        self.client.close()


def transient_status(status: int) -> bool:
    """Whether an HTTP status of one request inside a batch is worth another try."""
    return status in (408, 409, 429, 529) or status >= 500


def rfc3339(value: object) -> float:
    """Unix time of an RFC 3339 string (0 when absent or unreadable)."""
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    except ValueError:
        return 0.0

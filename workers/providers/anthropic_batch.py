"""Anthropic's Message Batches: create, retrieve, results, cancel.

* ``POST /v1/messages/batches`` ``{"requests": [{"custom_id": job id, "params": ...}]}``:
  each request's params are the Messages API body the live call sends
  (``AnthropicProvider.payloads``), prepared a prefix family at a time so that the
  family's shared system prompt or leading text is marked with ``cache_control``.
* ``GET /v1/messages/batches/{id}``: ``processing_status`` in_progress, canceling or
  ended, ``request_counts`` (processing, succeeded, errored, canceled, expired),
  ``results_url`` once ended, ``created_at`` (RFC 3339).
* ``GET results_url``: JSONL, one line per request, in any order: ``{custom_id, result:
  {type: succeeded, message} | {type: errored, error} | {type: canceled} | {type:
  expired}}``; a message is read as a live answer (``from_anthropic``).
* ``POST /v1/messages/batches/{id}/cancel``.

A message batch has no metadata. After a crash between creating one and recording its
id, ``GET /v1/messages/batches`` (newest first) gives the candidates: created since the
attempt began (less a few minutes of clock difference) and holding exactly its number of
requests; the caller leaves out those another record holds, and checks the results'
custom ids (the job ids) once the batch has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from config.settings import Settings
from workers.providers.anthropic import AnthropicProvider, answer_shape, from_anthropic
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.batch_api import (
    BatchAPIError,
    HttpBatchClient,
    LineResult,
    Upstream,
    families,
    rfc3339,
    stream_lines,
)

#: Error types of a request that are its own fault: the job fails with them.
OWN_ERRORS = frozenset({"invalid_request_error", "not_found_error", "permission_error",
                        "request_too_large"})
#: Batches looked at, newest first, when looking for one an earlier attempt created.
FIND_PAGES, FIND_PAGE = 10, 100
#: Seconds of clock difference allowed between us and the provider.
SKEW_S = 300.0


def bodies(provider: AnthropicProvider,
           requests: Sequence[ProviderRequest]) -> list[dict[str, Any]]:
    """The ``requests`` entries of a message batch, a prefix family at a time (a request
    that cannot be said in Anthropic's terms is left out: it has no result, so it runs on
    the fast path, which fails it with the reason)."""
    out: list[dict[str, Any]] = []
    for family in families(requests):
        for req, body in zip(family, provider.payloads(family), strict=True):
            if isinstance(body, dict):
                out.append({"custom_id": req.job_id, "params": body})
    return out


def upstream(data: Any) -> Upstream:
    """A message batch object as ``Upstream``."""
    status = str(data.get("processing_status") or "")
    counts = {k: int(v or 0) for k, v in (data.get("request_counts") or {}).items()}
    return Upstream(id=str(data["id"]), status=status, ended=status == "ended",
                    counts=counts, output=data.get("results_url"),
                    created_at=rfc3339(data.get("created_at")), total=sum(counts.values()))


def line_result(line: Any, requests: Mapping[str, ProviderRequest] | None = None,
                ) -> LineResult:
    """One line of a message batch's results (``requests``: the batch's requests by job
    id, for how each answer is read back: ``answer_shape``)."""
    job_id = str(line.get("custom_id") or "")
    result = _obj(line.get("result"))
    kind = str(result.get("type") or "")
    if kind == "succeeded":
        message = result.get("message")
        req = (requests or {}).get(job_id)
        shape = answer_shape(req) if req is not None else None
        return LineResult(job_id, reply=from_anthropic(job_id, message, shape,
                                                       str(message)[:2000]))
    if kind == "errored":
        outer: dict[str, Any] = _obj(result.get("error"))
        inner: dict[str, Any] = _obj(outer.get("error")) or outer
        error_type = str(inner.get("type") or "error")
        message = str(inner.get("message") or error_type)
        if error_type in OWN_ERRORS:
            return LineResult(job_id, reply=ProviderReply(
                job_id=job_id, error=f"{error_type} (in the provider batch): {message}"))
        return LineResult(job_id, again=True, why=f"{error_type}: {message}")
    return LineResult(job_id, again=True, why=kind or "no result")


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class AnthropicBatch(HttpBatchClient):
    """Message Batches of the Anthropic API."""

    provider = "anthropic"

    def __init__(self, settings: Settings, *, base_url: str | None = None,
                 api_key: str | None = None) -> None:
        key = api_key if api_key is not None else settings.anthropic_api_key.get_secret_value()
        super().__init__(settings, base_url or settings.anthropic_base_url,
                         {"x-api-key": key, "anthropic-version": settings.anthropic_version})
        self.translator = AnthropicProvider(settings, base_url=self.base_url, api_key=key)

    def create(self, batch_id: str, requests: Sequence[ProviderRequest], *,
               input_file_id: str | None = None,
               on_file: Callable[[str], None] | None = None) -> str:
        entries = bodies(self.translator, requests)
        if not entries:
            raise BatchAPIError("no request of the batch can be said in Anthropic's terms",
                                transient=False)
        created = self._call("POST", "/v1/messages/batches", "creating the message batch",
                             json={"requests": entries})
        return str(created["id"])

    def find(self, batch_id: str, total: int, since: float) -> list[str]:
        found: list[str] = []
        after: str | None = None
        for _ in range(FIND_PAGES):
            params: dict[str, Any] = {"limit": FIND_PAGE,
                                      **({"after_id": after} if after else {})}
            page = self._call("GET", "/v1/messages/batches", "listing message batches",
                              params=params)
            data = page.get("data") or []
            for item in data:
                got = upstream(item)
                if got.created_at >= since - SKEW_S and got.total == total:
                    found.append(got.id)
            if not page.get("has_more") or not data or any(
                    upstream(x).created_at < since - SKEW_S for x in data):
                break
            after = str(page.get("last_id") or data[-1]["id"])
        return found

    def status(self, provider_id: str) -> Upstream:
        return upstream(self._call("GET", f"/v1/messages/batches/{provider_id}",
                                   "polling the message batch"))

    def results(self, found: Upstream, requests: Mapping[str, ProviderRequest],
                ) -> Iterator[LineResult]:
        url = found.output or f"{self.base_url}/v1/messages/batches/{found.id}/results"
        for line in stream_lines(self.client, str(url), "reading the message batch's results",
                                 self._headers):
            yield line_result(line, requests)

    def cancel(self, provider_id: str) -> None:
        self._call("POST", f"/v1/messages/batches/{provider_id}/cancel",
                   "cancelling the message batch")

    def close(self) -> None:
        self.translator.close()
        super().close()


__all__ = ["AnthropicBatch", "bodies", "line_result", "upstream"]

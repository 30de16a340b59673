"""OpenAI's Batch API (and any server that speaks it, promptbatch's own included): the
input file, the batch, its status, its output and error files, cancelling.

* The input file: a JSONL line per job ``{"custom_id": job id, "method": "POST",
  "url": "/v1/chat/completions", "body": ...}``, the body as the live call sends it
  (``to_openai``), each prefix family's lines together with one ``prompt_cache_key``.
  Uploaded with ``POST /v1/files`` (``purpose=batch``).
* ``POST /v1/batches`` ``{input_file_id, endpoint, completion_window: "24h", metadata:
  {"promptbatch_batch": our id}}``: after a crash, ``GET /v1/batches`` (newest first)
  finds a batch an earlier attempt created by that metadata.
* ``GET /v1/batches/{id}``: ``status`` validating, in_progress, finalizing, completed,
  failed, expired, cancelling, cancelled (the last four: ended), ``request_counts``,
  ``output_file_id``, ``error_file_id``.
* ``GET /v1/files/{id}/content``: lines ``{custom_id, response: {status_code, body},
  error: {code, message}}``; a 200's body is read as a live answer (``from_openai``).
* ``POST /v1/batches/{id}/cancel``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from config.settings import Settings
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.batch_api import (
    HttpBatchClient,
    LineResult,
    Upstream,
    families,
    stream_lines,
    transient_status,
)
from workers.providers.http import cache_key
from workers.providers.openai_translation import from_openai, to_openai

ENDPOINT = "/v1/chat/completions"
#: The metadata key that names our batch.
OURS = "promptbatch_batch"
#: Statuses after which the provider does nothing more with a batch.
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
#: Error codes of a line that are the request's own fault: the job fails with them.
OWN_ERRORS = frozenset({"invalid_request", "invalid_request_error", "invalid_prompt",
                        "context_length_exceeded", "content_policy_violation"})
#: Batches looked at, newest first, when looking for one an earlier attempt created.
FIND_PAGES, FIND_PAGE = 20, 100
#: Seconds of clock difference allowed between us and the provider.
SKEW_S = 300.0


def input_file(requests: Sequence[ProviderRequest], prompt_cache_key: bool = True) -> bytes:
    """The JSONL input file of a provider batch: prefix families together, each with one
    ``prompt_cache_key`` (a hash of its shared prefix)."""
    out: list[bytes] = []
    for family in families(requests):
        key = cache_key([r.text for r in family]) if prompt_cache_key else None
        for r in family:
            out.append(json.dumps({"custom_id": r.job_id, "method": "POST", "url": ENDPOINT,
                                   "body": to_openai(r, key)}).encode() + b"\n")
    return b"".join(out)


def upstream(data: Any) -> Upstream:
    """A batch object as ``Upstream``."""
    status = str(data.get("status") or "")
    counts = {k: int(v or 0) for k, v in (data.get("request_counts") or {}).items()}
    failure = None
    if status == "failed":
        errors = (data.get("errors") or {}).get("data") or []
        failure = "; ".join(str(e.get("message") or e.get("code")) for e in errors
                            if isinstance(e, dict)) or "the provider failed the batch"
    return Upstream(id=str(data["id"]), status=status, ended=status in ENDED, counts=counts,
                    output=data.get("output_file_id"), errors=data.get("error_file_id"),
                    created_at=float(data.get("created_at") or 0),
                    total=counts.get("total", 0),
                    ours=(data.get("metadata") or {}).get(OURS), failure=failure)


def line_result(line: Any) -> LineResult:
    """One line of an output or error file."""
    job_id = str(line.get("custom_id") or "")
    response = line.get("response")
    if isinstance(response, dict):
        status = int(response.get("status_code") or 0)
        body = response.get("body")
        if status == 200:
            return LineResult(job_id, reply=from_openai(job_id, body, json.dumps(body)[:2000]))
        message = _message(body) or f"HTTP {status}"
        if transient_status(status):
            return LineResult(job_id, again=True, why=f"HTTP {status}: {message}")
        return LineResult(job_id, reply=ProviderReply(
            job_id=job_id, error=f"HTTP {status} (in the provider batch): {message}"))
    error = line.get("error") if isinstance(line.get("error"), dict) else {}
    code = str(error.get("code") or "error")
    message = str(error.get("message") or code)
    if code in OWN_ERRORS:
        return LineResult(job_id, reply=ProviderReply(
            job_id=job_id, error=f"{code} (in the provider batch): {message}"))
    return LineResult(job_id, again=True, why=f"{code}: {message}")


def _message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("code") or "")
        if isinstance(err, str):
            return err
    return ""


class OpenAIBatch(HttpBatchClient):
    """The Batch API of one OpenAI-compatible server."""

    provider = "openai"

    def __init__(self, settings: Settings, *, base_url: str | None = None,
                 api_key: str | None = None) -> None:
        key = api_key if api_key is not None else settings.openai_api_key.get_secret_value()
        super().__init__(settings, base_url or settings.openai_base_url,
                         {"Authorization": f"Bearer {key}"} if key else {})

    def create(self, batch_id: str, requests: Sequence[ProviderRequest], *,
               input_file_id: str | None = None,
               on_file: Callable[[str], None] | None = None) -> str:
        if input_file_id is None:
            content = input_file(requests, self.settings.openai_prompt_cache_key)
            uploaded = self._call("POST", "/files", "uploading the batch's input file",
                                  data={"purpose": "batch"},
                                  files={"file": (f"promptbatch-{batch_id}.jsonl", content,
                                                  "application/jsonl")})
            input_file_id = str(uploaded["id"])
            if on_file is not None:
                on_file(input_file_id)
        created = self._call("POST", "/batches", "creating the batch", json={
            "input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": "24h",
            "metadata": {OURS: batch_id}})
        return str(created["id"])

    def find(self, batch_id: str, total: int, since: float) -> list[str]:
        after: str | None = None
        for _ in range(FIND_PAGES):
            params: dict[str, Any] = {"limit": FIND_PAGE, **({"after": after} if after else {})}
            page = self._call("GET", "/batches", "listing batches", params=params)
            data = page.get("data") or []
            for item in data:
                found = upstream(item)
                if found.ours == batch_id:
                    return [found.id]
            if not page.get("has_more") or not data or any(
                    float(x.get("created_at") or 0) < since - SKEW_S for x in data):
                return []
            after = str(data[-1]["id"])
        return []

    def status(self, provider_id: str) -> Upstream:
        return upstream(self._call("GET", f"/batches/{provider_id}", "polling the batch"))

    def results(self, found: Upstream, requests: Mapping[str, ProviderRequest],
                ) -> Iterator[LineResult]:
        for file_id in (found.output, found.errors):
            if file_id:
                yield from self._lines(str(file_id))

    def _lines(self, file_id: str) -> Iterator[LineResult]:
        for line in stream_lines(self.client, f"{self.base_url}/files/{file_id}/content",
                                 f"reading the batch's file {file_id}", self._headers):
            yield line_result(line)

    def cancel(self, provider_id: str) -> None:
        self._call("POST", f"/batches/{provider_id}/cancel", "cancelling the batch")


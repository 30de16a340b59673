"""``promptbatch submit --url``: a JSONL file through the HTTP API, resumable.

The bulk run of ``promptbatch.bulk`` over HTTP: chunks of lines posted to
``POST /v1/jobs`` while at most a window of jobs is pending, results read many at a time
through ``POST /v1/jobs/results``. Each line's idempotency key is derived from the
file's content and the line number, and the ids the API returns are recorded in a state
folder beside the output as chunks are acknowledged. Run the same command again after an
interruption: lines with a recorded id are not sent again (and a line sent but not
recorded is matched by its idempotency key, so the API creates nothing twice), and the
output file is completed in input order.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

import httpx

from jobs.models import JobRequest, JobResult

#: Ids per POST /v1/jobs/results.
RESULTS_PER_CALL = 1000
#: Tries of a request while the API is unreachable or busy, after the first.
RETRIES = 5


class RemoteError(RuntimeError):
    """Raised when the API refuses a request or cannot be reached. ``retryable``: the same
    request may succeed later (the API was unreachable or answered 5xx or 429); a 4xx
    refusal will not, whatever the number of tries."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class RemoteClient:
    """A small client of the promptbatch HTTP API."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def _check(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                detail = "; ".join(f"{e['field']}: {e['message']}"
                                   for e in err.get("errors", [])) or err["message"]
            except (ValueError, KeyError, TypeError):
                detail = resp.text[:500]
            raise RemoteError(f"the API answered {resp.status_code}: {detail}",
                              retryable=resp.status_code >= 500 or resp.status_code == 429)
        return resp.json()

    def _post(self, path: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
        """POST, tried again (``RETRIES`` times, honouring Retry-After) while the API is
        unreachable or answers 429 or 502-504: every request here is idempotent."""
        for attempt in range(RETRIES + 1):
            try:
                resp = self.http.post(path, json=body, timeout=timeout)
                if resp.status_code not in (429, 502, 503, 504) or attempt == RETRIES:
                    return self._check(resp)
                pause = _retry_after(resp) or min(8.0, 0.5 * 2 ** attempt)
            except httpx.HTTPError as exc:
                if attempt == RETRIES:
                    raise RemoteError(f"cannot reach the API: {exc}") from exc
                pause = min(8.0, 0.5 * 2 ** attempt)
            time.sleep(pause)  # backing off before the next try
        raise AssertionError("unreachable")

    def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        return list(self._post("/v1/jobs", {"jobs": jobs})["ids"])

    def results(self, ids: list[str], wait: float) -> tuple[list[dict[str, Any]], list[str]]:
        """The finished ones' results, and the ids the API does not know for this key."""
        body = self._post("/v1/jobs/results", {"ids": ids, "wait": wait},
                          timeout=wait + 60.0)
        return list(body["data"]), list(body["unknown"])

    def close(self) -> None:
        self.http.close()


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return min(30.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return None


class RemoteBackend:
    """A bulk run through the HTTP API (``promptbatch.bulk.Backend``): chunks posted to
    ``POST /v1/jobs``, results read ``RESULTS_PER_CALL`` at a time through
    ``POST /v1/jobs/results``: the oldest pending first, and the others in turn."""

    def __init__(self, client: RemoteClient) -> None:
        self.client = client
        self._turn = 0

    def submit(self, requests: list[JobRequest]) -> list[str]:
        jobs = []
        for req in requests:
            job = req.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
            if req.params:
                job["params"] = req.params.model_dump(exclude_none=True)
            jobs.append(job)
        return self.client.submit(jobs)

    def collect(self, pending: Collection[str], *, sweep: bool,
                sql: bool) -> list[JobResult]:
        if not pending:
            return []
        ids = list(pending)
        asks = [ids[:RESULTS_PER_CALL]]  # the oldest, waiting briefly for news
        if sweep and len(ids) > RESULTS_PER_CALL:  # and, in turn, one more slice
            rest = ids[RESULTS_PER_CALL:]
            self._turn %= len(rest)
            asks.append(rest[self._turn:self._turn + RESULTS_PER_CALL])
            self._turn += RESULTS_PER_CALL
        found: list[JobResult] = []
        for n, part in enumerate(asks):
            data, unknown = self.client.results(part, wait=0.5 if n == 0 else 0.0)
            if unknown:
                raise RemoteError(f"the API does not know job {unknown[0]} (another "
                                  "tenant's key, or a job store that forgot it)",
                                  retryable=False)
            found += [JobResult.model_validate(d) for d in data]
        return found

    def collected(self, job_ids: list[str]) -> None:
        return None

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

from collections.abc import Collection
from typing import Any

from jobs.models import JobRequest, JobResult
from promptbatch.http import ApiError, Client

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
    """The bulk run's view of the HTTP SDK (``promptbatch.http.Client``): its errors as
    ``RemoteError``, saying whether running the command again may help."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0) -> None:
        self.sdk = Client(url, api_key, timeout=timeout, max_retries=RETRIES)

    def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        try:  # every job carries its own idempotency key: a retried chunk is accepted once
            return self.sdk.submit_many(jobs, chunk=max(1, len(jobs)))
        except ApiError as exc:
            raise _remote(exc) from exc

    def results(self, ids: list[str], wait: float) -> tuple[list[dict[str, Any]], list[str]]:
        """The finished ones' results, and the ids the API does not know for this key."""
        try:
            found, unknown = self.sdk.poll_results(ids, wait)
        except ApiError as exc:
            raise _remote(exc) from exc
        return [r.model_dump(mode="json") for r in found], unknown

    def close(self) -> None:
        self.sdk.close()


def _remote(exc: ApiError) -> RemoteError:
    if exc.status == 0:
        return RemoteError(f"cannot reach the API: {exc.message}")
    detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in exc.errors) \
        or exc.message
    return RemoteError(f"the API answered {exc.status}: {detail}",
                       retryable=exc.status >= 500 or exc.status == 429)


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

    def finished(self, job_ids: list[str]) -> list[JobResult]:
        found: list[JobResult] = []
        for start in range(0, len(job_ids), RESULTS_PER_CALL):
            data, _ = self.client.results(job_ids[start:start + RESULTS_PER_CALL], wait=0.0)
            found += [JobResult.model_validate(d) for d in data]
        return found

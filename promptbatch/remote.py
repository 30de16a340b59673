"""``promptbatch submit --url``: a JSONL file through the HTTP API, resumable.

Each line's idempotency key is derived from the file's content and the line number, and
the ids the API returns are recorded in a state file beside the output as chunks are
acknowledged. Run the same command again after an interruption: lines with a recorded
id are not sent again (and a line sent but not recorded is matched by its idempotency
key, so the API creates nothing twice), and the output file is completed in input order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from promptbatch.jsonl import InputLine

#: Lines per POST /v1/jobs.
CHUNK = 1000


class RemoteError(RuntimeError):
    """Raised when the API refuses a request or cannot be reached. ``retryable``: the same
    request may succeed later (the API was unreachable or answered 5xx or 429); a 4xx
    refusal will not, whatever the number of tries."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class StateFile:
    """Line number -> job id, saved after every acknowledged chunk."""

    def __init__(self, path: Path, digest: str) -> None:
        self.path = path
        self.digest = digest
        self.ids: dict[int, str] = {}
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("file") == digest:
                self.ids = {int(k): v for k, v in data["ids"].items()}

    def save(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"file": self.digest, "ids": self.ids}), encoding="utf-8")
        tmp.replace(self.path)


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

    def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        try:
            resp = self.http.post("/v1/jobs", json={"jobs": jobs})
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the API: {exc}") from exc
        return list(self._check(resp)["ids"])

    def result(self, job_id: str, wait: float) -> dict[str, Any] | None:
        try:
            resp = self.http.get(f"/v1/jobs/{job_id}/result", params={"wait": wait},
                                 timeout=wait + 30)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the API: {exc}") from exc
        if resp.status_code == 202:
            return None
        return self._check(resp)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.http.close()


def submit_file(client: RemoteClient, lines: list[InputLine], digest: str, state: StateFile,
                on_progress: Callable[[int], None], chunk: int = CHUNK) -> list[str]:
    """Submit the lines without a recorded id; return every line's id, in order."""
    missing = [ln for ln in lines if ln.number not in state.ids]
    on_progress(len(lines) - len(missing))
    for start in range(0, len(missing), chunk):
        part = missing[start:start + chunk]
        jobs = []
        for ln in part:
            job = ln.request.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
            job["idempotency_key"] = ln.request.idempotency_key or f"{digest}:{ln.number}"
            if ln.request.params:
                job["params"] = ln.request.params.model_dump(exclude_none=True)
            jobs.append(job)
        ids = client.submit(jobs)
        state.ids.update({ln.number: job_id for ln, job_id in zip(part, ids, strict=True)})
        state.save()
        on_progress(len(part))
    return [state.ids[ln.number] for ln in lines]


def wait_all(client: RemoteClient, ids: list[str], on_done: Callable[[], None],
             known: dict[str, dict[str, Any]] | None = None,
             timeout: float = 24 * 3600.0) -> dict[str, dict[str, Any]]:
    """Results of the jobs (long-polling each in turn), as they finish."""
    results = dict(known or {})
    for _ in results:
        on_done()
    pending = [i for i in ids if i not in results]
    deadline = time.monotonic() + timeout
    while pending:
        still = []
        for job_id in pending:
            res = client.result(job_id, wait=0 if len(pending) > 1 else 10)
            if res is None:
                still.append(job_id)
            else:
                results[job_id] = res
                on_done()
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise RemoteError(f"{len(pending)} jobs did not finish within {timeout} s")
            time.sleep(0.2)
    return results

"""The OpenAI Batch API on top of promptbatch jobs.

A batch is a JSONL file of ``{"custom_id", "method": "POST", "url": endpoint, "body"}``
lines. Each valid line becomes a ``bulk`` job whose deadline is the completion window;
an invalid line is reported in the error file and the others run. The batch's status is
derived from its jobs' states; once all are final, the output file (one line per
successful request, in input order, keyed by ``custom_id``) and the error file are
written.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from typing import Any

from config.settings import Settings
from jobs import jsonbody
from jobs.errors import InvalidJob, JobNotFound
from jobs.ids import new_id
from jobs.models import JobResult, JobSpec, JobState, Priority
from jobs.validation import parse_request, resolve
from producers.accounts import Accounts
from producers.client import Client

ENDPOINTS = ("/v1/chat/completions",)
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")
_PARAMS = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty",
           "frequency_penalty")
#: Batch states that still change.
OPEN = ("validating", "in_progress", "finalizing", "cancelling")


class BatchError(Exception):
    """Raised for a batch request the API refuses (status, field, message)."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message


def _request_of(line: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The JobRequest fields of one batch input line (raises ValueError with a reason)."""
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        raise ValueError("custom_id must be a non-empty string")
    if line.get("method", "POST") != "POST":
        raise ValueError("method must be POST")
    if line.get("url") != endpoint:
        raise ValueError(f"url must be {endpoint}, the batch's endpoint")
    body = line.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be an object")
    params = {k: body[k] for k in _PARAMS if k in body}
    if "max_completion_tokens" in body:
        params["max_tokens"] = body["max_completion_tokens"]
    return {"messages": body.get("messages"), "model": body.get("model"), "params": params}


class BatchService:
    """Files and batches of one promptbatch deployment."""

    def __init__(self, settings: Settings, client: Client, accounts: Accounts) -> None:
        self.settings = settings
        self.client = client
        self.accounts = accounts

    # --- files --------------------------------------------------------------------------

    def create_file(self, tenant: str, purpose: str, filename: str,
                    content: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise BatchError(422, "purpose", "only purpose=batch is supported")
        row = self.accounts.put_file(f"file-{uuid.uuid4().hex}", tenant, purpose, filename,
                                     content)
        return file_object(row["id"], row["bytes"], row["created_at"], filename, purpose)

    def file_content(self, tenant: str, file_id: str) -> bytes:
        row = self.accounts.get_file(file_id, tenant)
        if row is None:
            raise JobNotFound(file_id)
        return row.content

    def file_info(self, tenant: str, file_id: str) -> dict[str, Any]:
        row = self.accounts.get_file(file_id, tenant)
        if row is None:
            raise JobNotFound(file_id)
        return file_object(row.id, row.size, row.created_at, row.filename, row.purpose)

    # --- batches ------------------------------------------------------------------------

    def create_batch(self, tenant: str, input_file_id: str, endpoint: str,
                     completion_window: str, metadata: dict[str, str] | None) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise BatchError(422, "endpoint", f"endpoint must be one of {', '.join(ENDPOINTS)}")
        window = _WINDOW.match(completion_window or "")
        if not window:
            raise BatchError(422, "completion_window", "completion_window must be like '24h'")
        source = self.accounts.get_file(input_file_id, tenant)
        if source is None:
            raise BatchError(404, "input_file_id", f"no file {input_file_id!r}")
        now = time.time()
        batch_id = f"batch_{uuid.uuid4().hex}"
        deadline = now + int(window.group(1)) * 3600
        specs, jobs, invalid = self._read_lines(source.content, endpoint, batch_id, tenant,
                                                now, deadline)
        record: dict[str, Any] = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window,
            "status": "in_progress", "output_file_id": None, "error_file_id": None,
            "created_at": int(now), "in_progress_at": int(now), "expires_at": int(deadline),
            "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(jobs) + len(invalid), "completed": 0,
                               "failed": len(invalid)},
            "metadata": metadata or None, "_jobs": jobs, "_invalid": invalid,
        }
        if specs:
            self.client.check_quota(specs)
            ids = self.client.submit_specs(specs)
            record["_jobs"] = [[cid, job_id] for (cid, _), job_id in zip(jobs, ids, strict=True)]
        self.accounts.put_batch(batch_id, tenant, record)
        return self.refresh(tenant, record)

    def _read_lines(self, content: bytes, endpoint: str, batch_id: str, tenant: str,
                    now: float, deadline: float,
                    ) -> tuple[list[JobSpec], list[list[str]], list[list[Any]]]:
        specs: list[JobSpec] = []
        jobs: list[list[str]] = []
        invalid: list[list[Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
            if not raw.strip():
                continue
            custom_id = None
            try:
                line = jsonbody.parse(raw, self.settings.api_max_json_depth)
                if not isinstance(line, dict):
                    raise ValueError("a line must be a JSON object")
                custom_id = line.get("custom_id") if isinstance(line.get("custom_id"),
                                                                str) else None
                if custom_id in seen:
                    raise ValueError(f"custom_id {custom_id!r} is used twice")
                fields = _request_of(line, endpoint)
                fields.update(priority=Priority.BULK, deadline=None,
                              provider=self.settings.batch_provider or None,
                              idempotency_key=f"{batch_id}:{custom_id}",
                              metadata={"batch_id": batch_id, "custom_id": custom_id})
                request = parse_request(fields, line=number)
                spec = resolve(request, job_id=new_id(), now=now,
                               settings=self.settings, tenant=tenant, line=number)
                spec = spec.model_copy(update={"deadline": deadline})
            except InvalidJob as exc:  # its message already names the line
                invalid.append([number, custom_id, str(exc)])
                continue
            except ValueError as exc:
                invalid.append([number, custom_id, f"line {number}: {exc}"])
                continue
            seen.add(str(custom_id))
            specs.append(spec)
            jobs.append([str(custom_id), spec.id])
        return specs, jobs, invalid

    def get(self, tenant: str, batch_id: str) -> dict[str, Any]:
        record = self.accounts.get_batch(batch_id, tenant)
        if record is None:
            raise JobNotFound(batch_id)
        return self.refresh(tenant, record)

    def cancel(self, tenant: str, batch_id: str) -> dict[str, Any]:
        record = self.accounts.get_batch(batch_id, tenant)
        if record is None:
            raise JobNotFound(batch_id)
        if record["status"] in OPEN:
            for _, job_id in record["_jobs"]:
                self.client.cancel(job_id, tenant)
            record["status"] = "cancelling"
            record["cancelling_at"] = int(time.time())
            self.accounts.update_batch(batch_id, record)
        return self.refresh(tenant, record)

    def list(self, tenant: str, limit: int, after: str | None) -> dict[str, Any]:
        rows = [public(self.refresh(tenant, r)) for r in
                self.accounts.list_batches(tenant, limit + 1, after)]
        data = rows[:limit]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    def refresh(self, tenant: str, record: dict[str, Any]) -> dict[str, Any]:
        """Bring an open batch's counts and status up to date; write its files when done."""
        if record["status"] not in OPEN:
            return record
        ids = [job_id for _, job_id in record["_jobs"]]
        stored = self.client.store.get_many(ids)
        states = Counter(s.state for s in stored.values())
        invalid = len(record["_invalid"])
        record["request_counts"] = {
            "total": len(ids) + invalid, "completed": states[JobState.SUCCEEDED],
            "failed": invalid + sum(n for st, n in states.items()
                                    if st.final and st is not JobState.SUCCEEDED)}
        if all(s.state.final for s in stored.values()) and len(stored) == len(ids):
            self._finish(tenant, record, stored)
        self.accounts.update_batch(record["id"], record)
        return record

    def _finish(self, tenant: str, record: dict[str, Any], stored: dict[str, Any]) -> None:
        now = int(time.time())
        out_lines, err_lines = [], []
        by_line = sorted([(-1, cid, jid) for cid, jid in record["_jobs"]]
                         + [(n, cid, None) for n, cid, _ in record["_invalid"]],
                         key=lambda t: t[0])
        messages = {n: m for n, _, m in record["_invalid"]}
        for number, custom_id, job_id in by_line:
            if job_id is None:
                err_lines.append({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                                  "response": None, "error": {"code": "invalid_request",
                                                              "message": messages[number]}})
                continue
            result: JobResult | None = stored[job_id].result
            if result is not None and result.state is JobState.SUCCEEDED:
                out_lines.append(output_line(custom_id, result))
            else:
                state = result.state.value if result else "FAILED"
                err_lines.append({"id": f"batch_req_{job_id}", "custom_id": custom_id,
                                  "response": None, "error": {
                                      "code": state.lower(),
                                      "message": (result.error if result else None) or state}})
        for kind, lines in (("output_file_id", out_lines), ("error_file_id", err_lines)):
            if lines:
                content = "".join(json.dumps(x) + "\n" for x in lines).encode()
                row = self.accounts.put_file(f"file-{uuid.uuid4().hex}", tenant,
                                             "batch_output", f"{record['id']}_{kind}.jsonl",
                                             content)
                record[kind] = row["id"]
        states = {s.state for s in stored.values()}
        if record["status"] == "cancelling":
            record["status"], record["cancelled_at"] = "cancelled", now
        elif JobState.EXPIRED in states:
            record["status"], record["expired_at"] = "expired", now
        else:
            record["status"], record["completed_at"] = "completed", now
        record["finalizing_at"] = now


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A batch as the OpenAI API shows it (without our bookkeeping)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def file_object(file_id: str, size: int, created_at: float, filename: str,
                purpose: str) -> dict[str, Any]:
    """A file as the OpenAI API shows it."""
    return {"id": file_id, "object": "file", "bytes": size, "created_at": int(created_at),
            "filename": filename, "purpose": purpose, "status": "processed"}


def output_line(custom_id: str, result: JobResult) -> dict[str, Any]:
    """One line of a batch's output file, as OpenAI writes it."""
    usage = result.usage
    body = {
        "id": f"chatcmpl-{result.id}", "object": "chat.completion",
        "created": int(result.finished_at), "model": result.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": "stop"}],
        "usage": None if usage is None else {
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}},
    }
    return {"id": f"batch_req_{result.id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": result.id, "body": body},
            "error": None}

"""The OpenAI Batch API on top of promptbatch jobs.

A batch is a JSONL file of ``{"custom_id", "method": "POST", "url": endpoint, "body"}``
lines. Each valid line becomes a ``bulk`` job whose deadline is the completion window;
an invalid line is reported in the error file and the others run. The batch's status is
derived from its jobs' states; once all are final, the output file (one line per
successful request, in input order, keyed by ``custom_id``) and the error file (one line
per other request: ``error_line``, the raw answer kept where there was one) are written.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from config.settings import Settings
from jobs import jsonbody
from jobs.errors import InvalidJob, JobNotFound
from jobs.ids import new_id
from jobs.models import JobResult, JobSpec, JobState, Priority
from jobs.validation import parse_request, resolve
from producers.accounts import Accounts
from producers.client import Client
from producers.models import resolve_model
from producers.openai_answer import BatchUsage, completion
from producers.openai_request import job_fields, openai_errors

ENDPOINTS = ("/v1/chat/completions",)
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")
#: Batch states that still change.
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
#: Lines submitted per step (each all or nothing), and results read per query.
CHUNK = 1000


class BatchError(Exception):
    """Raised for a batch request the API refuses (status, field, message)."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message


def _request_of(line: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The JobRequest fields of one batch input line, its ``model`` as written (raises
    ValueError with a reason, ``InvalidJob`` naming ``body.<field>``): the body is read as
    the chat endpoint reads one (``producers.openai_request``), without our own fields."""
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        raise ValueError("custom_id must be a non-empty string")
    if line.get("method", "POST") != "POST":
        raise ValueError("method must be POST")
    if line.get("url") != endpoint:
        raise ValueError(f"url must be {endpoint}, the batch's endpoint")
    body = line.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be an object")
    try:
        fields = job_fields(body, ours=False, batch=True)
    except InvalidJob as exc:
        raise openai_errors(exc, body, "body.") from exc
    fields["model"] = body["model"]
    return fields


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

    def list_files(self, tenant: str, limit: int, after: str | None,
                   purpose: str | None) -> dict[str, Any]:
        rows = self.accounts.list_files(tenant, limit + 1, after, purpose)
        data = [file_object(i, n, at, name, p) for i, n, at, name, p in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    def delete_file(self, tenant: str, file_id: str) -> dict[str, Any]:
        if not self.accounts.delete_file(file_id, tenant):
            raise JobNotFound(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches ------------------------------------------------------------------------

    def create_batch(self, tenant: str, input_file_id: str, endpoint: str,
                     completion_window: str, metadata: dict[str, str] | None,
                     api_key: str | None = None) -> dict[str, Any]:
        """Validate and submit the input file's lines, ``CHUNK`` at a time (each chunk
        all or nothing; the file is read line by line, never parsed whole). The batch is
        recorded first (``validating``): should a chunk be refused (Redis or the store
        down, the tenant over its quota), the jobs accepted so far are cancelled, the
        batch ends ``failed`` with the reason, and the error goes up. ``api_key``: the
        submitting key's prefix (its budget applies to every chunk)."""
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
        record: dict[str, Any] = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window,
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": int(now), "in_progress_at": None, "expires_at": int(deadline),
            "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata or None, "_jobs_file": None, "_invalid": 0,
        }
        self.accounts.put_batch(batch_id, tenant, record)
        listing = io.BytesIO()  # line, custom_id, job id or None, error or None
        accepted = invalid = 0
        try:
            for chunk, rows in self._chunks(source.content, endpoint, batch_id, tenant, now,
                                            deadline):
                if chunk:
                    self.client.submitter.check_quota(chunk)
                    ids = iter(job_id for job_id, _ in self.client.submitter
                               .submit_specs_states(chunk, api_key=api_key))
                    rows = [[n, cid, next(ids), None] if err is None else [n, cid, None, err]
                            for n, cid, _, err in rows]
                for row in rows:
                    listing.write(json.dumps(row).encode() + b"\n")
                accepted += len(chunk)
                invalid += sum(1 for row in rows if row[3] is not None)
        except Exception as exc:
            self._fail(tenant, record, listing, exc)
            raise
        jobs_file = self.accounts.put_file(f"file-{uuid.uuid4().hex}", tenant, "batch_jobs",
                                           f"{batch_id}_jobs.jsonl", listing.getvalue())
        record.update(status="in_progress", in_progress_at=int(time.time()),
                      _jobs_file=jobs_file["id"], _invalid=invalid,
                      request_counts={"total": accepted + invalid, "completed": 0,
                                      "failed": invalid})
        self.accounts.update_batch(batch_id, record)
        return self.refresh(tenant, record)

    def _chunks(self, content: bytes, endpoint: str, batch_id: str, tenant: str,
                now: float, deadline: float,
                ) -> Iterator[tuple[list[JobSpec], list[list[Any]]]]:
        """The input's lines, ``CHUNK`` valid ones at a time: their specs, and a row per
        line read (``[line, custom_id, None, error or None]``)."""
        specs: list[JobSpec] = []
        rows: list[list[Any]] = []
        seen: set[str] = set()
        for number, raw_line in enumerate(io.BytesIO(content), 1):
            raw = raw_line.decode("utf-8", "replace")
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
                target = resolve_model(self.settings, fields.pop("model"))
                if self.settings.batch_provider and "provider" not in target:
                    target["provider"] = self.settings.batch_provider
                fields.update(target)
                fields.update(priority=Priority.BULK, deadline=None,
                              idempotency_key=f"{batch_id}:{custom_id}",
                              metadata={"batch_id": batch_id, "custom_id": custom_id})
                try:
                    request = parse_request(fields, line=number)
                    spec = self.client.submitter.vetted(resolve(
                        request, job_id=new_id(), now=now, settings=self.settings,
                        tenant=tenant, line=number), number)
                except InvalidJob as exc:
                    raise openai_errors(exc, line["body"], "body.") from exc
                specs.append(spec.model_copy(update={"deadline": deadline}))
                rows.append([number, custom_id, None, None])
                seen.add(str(custom_id))
            except InvalidJob as exc:  # its fields as the line names them (body.<field>)
                rows.append([number, custom_id, None, str(InvalidJob(exc.errors,
                                                                     line=number))])
            except ValueError as exc:
                rows.append([number, custom_id, None, f"line {number}: {exc}"])
            if len(specs) >= CHUNK:
                yield specs, rows
                specs, rows = [], []
        if specs or rows:
            yield specs, rows

    def _fail(self, tenant: str, record: dict[str, Any], listing: io.BytesIO,
              exc: Exception) -> None:
        """A chunk was refused: cancel what was accepted; the batch ends failed."""
        with contextlib.suppress(Exception):  # best effort: the store or Redis may be down
            ids = [row[2] for row in _rows(listing.getvalue()) if row[2]]
            for start in range(0, len(ids), CHUNK):
                self.client.cancel_many(ids[start:start + CHUNK], tenant)
        now = int(time.time())
        record.update(status="failed", failed_at=now, errors={"object": "list", "data": [
            {"code": type(exc).__name__, "message": str(exc), "param": None, "line": None}]})
        with contextlib.suppress(Exception):
            self.accounts.update_batch(record["id"], record)

    def _listing(self, tenant: str, record: dict[str, Any]) -> Iterator[list[Any]]:
        """The batch's rows (line, custom_id, job id, error), in input order."""
        if not record.get("_jobs_file"):
            return
        row = self.accounts.get_file(record["_jobs_file"], tenant)
        if row is not None:
            yield from _rows(row.content)

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
            ids = [row[2] for row in self._listing(tenant, record) if row[2]]
            for start in range(0, len(ids), CHUNK):
                self.client.cancel_many(ids[start:start + CHUNK], tenant)
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
        """Bring an open batch's counts and status up to date (its jobs counted per state in
        SQL, nothing loaded); write its files when every job is final."""
        if record["status"] not in OPEN or record["status"] == "validating":
            return record
        states = Counter({JobState(k): n for k, n in
                          self.accounts.batch_states(tenant, record["id"]).items()})
        invalid = int(record.get("_invalid", 0))
        jobs = record["request_counts"]["total"] - invalid
        final = sum(n for st, n in states.items() if st.final)
        record["request_counts"] = {
            "total": jobs + invalid, "completed": states[JobState.SUCCEEDED],
            "failed": invalid + final - states[JobState.SUCCEEDED]}
        if final >= jobs:
            self._finish(tenant, record, states)
        self.accounts.update_batch(record["id"], record)
        return record

    def _finish(self, tenant: str, record: dict[str, Any], states: Counter[JobState]) -> None:
        """Write the output and error files: the listing read in order, the jobs' results
        ``CHUNK`` at a time (their result JSON only)."""
        now = int(time.time())
        out, err = io.BytesIO(), io.BytesIO()
        listing = self._listing(tenant, record)
        spent = BatchUsage(self.client.submitter.prices)
        while True:
            rows: list[list[Any]] = list(itertools.islice(listing, CHUNK))
            if not rows:
                break
            raw = self.client.store.outcomes([r[2] for r in rows if r[2]])
            for _number, custom_id, job_id, error in rows:
                if job_id is None:
                    err.write(json.dumps({
                        "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                        "response": None, "error": {"code": "invalid_request",
                                                    "message": error}}).encode() + b"\n")
                    continue
                text = raw.get(job_id)
                result = JobResult.model_validate_json(text) if text else None
                if result is not None:
                    spent.add(result)
                if result is not None and result.state is JobState.SUCCEEDED:
                    out.write(json.dumps(output_line(custom_id, result)).encode() + b"\n")
                else:
                    err.write(json.dumps(error_line(custom_id, job_id, result)).encode()
                              + b"\n")
        for kind, buf in (("output_file_id", out), ("error_file_id", err)):
            if buf.tell():
                row = self.accounts.put_file(f"file-{uuid.uuid4().hex}", tenant,
                                             "batch_output", f"{record['id']}_{kind}.jsonl",
                                             buf.getvalue())
                record[kind] = row["id"]
        record["usage"] = spent.view()
        if record["status"] == "cancelling":
            record["status"], record["cancelled_at"] = "cancelled", now
        elif states[JobState.EXPIRED]:
            record["status"], record["expired_at"] = "expired", now
        else:
            record["status"], record["completed_at"] = "completed", now
        record["finalizing_at"] = now


def _rows(content: bytes) -> Iterator[list[Any]]:
    for line in io.BytesIO(content):
        if line.strip():
            yield json.loads(line)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A batch as the OpenAI API shows it (without our bookkeeping)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def file_object(file_id: str, size: int, created_at: float, filename: str,
                purpose: str) -> dict[str, Any]:
    """A file as the OpenAI API shows it."""
    return {"id": file_id, "object": "file", "bytes": size, "created_at": int(created_at),
            "filename": filename, "purpose": purpose, "status": "processed"}


def output_line(custom_id: str, result: JobResult) -> dict[str, Any]:
    """One line of a batch's output file, as OpenAI writes it (the body is the
    ``chat.completion`` the endpoint answers: ``producers.openai_answer``)."""
    body = completion(result, result.model or "", int(result.finished_at))
    return {"id": f"batch_req_{result.id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": result.id, "body": body},
            "error": None}


#: The status of an error line's response: what ``/v1/chat/completions`` answers for a
#: job that ended FAILED with an answer (the provider's answer was not usable).
FAILED_STATUS = 502


def error_line(custom_id: str, job_id: str, result: JobResult | None) -> dict[str, Any]:
    """One line of a batch's error file for a job that did not succeed: ``error`` with
    its ``code`` (``invalid_output``, ``expired``...) and ``message``. A job that got an
    answer and ended FAILED for it (an answer that never validated: ``invalid_output``)
    keeps it, as OpenAI writes a request that got an HTTP error: ``response`` with the
    status the chat endpoint answers (502), the job's id as ``request_id`` and a ``body``
    holding the ``error`` (OpenAI's error object) beside the raw answer as a
    ``chat.completion`` (its message's content and tool calls as the provider wrote
    them, and the usage paid for)."""
    state = result.state.value if result else "FAILED"
    code = (result.error_code if result else None) or state.lower()
    message = (result.error if result else None) or state
    line: dict[str, Any] = {"id": f"batch_req_{job_id}", "custom_id": custom_id,
                            "response": None, "error": {"code": code, "message": message}}
    if result is not None and (result.text is not None or result.tool_calls):
        body = completion(result, result.model or "", int(result.finished_at))
        body["error"] = {"message": message, "type": "provider_error", "param": None,
                         "code": code}
        line["response"] = {"status_code": FAILED_STATUS, "request_id": result.id,
                            "body": body}
    return line

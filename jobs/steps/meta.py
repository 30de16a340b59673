"""A job's result as Celery's Redis result backend stores it (``celery-task-meta-{id}``),
so that ``AsyncResult(job_id)`` works for any Celery user."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from jobs.models import JobResult, JobState

#: Celery state and exception type used for each final state.
_CELERY_OUTCOME: dict[JobState, tuple[str, str | None]] = {
    JobState.SUCCEEDED: ("SUCCESS", None),
    JobState.FAILED: ("FAILURE", "JobFailed"),
    JobState.EXPIRED: ("FAILURE", "JobExpired"),
    JobState.CANCELLED: ("FAILURE", "JobCancelled"),
}


def celery_meta(result: JobResult, public: str | None = None) -> str:
    """The result as Celery's Redis backend stores it, with our full record.

    A succeeded job's record is Celery's ``result``; a job that did not succeed has
    Celery's exception there, and the record under ``promptbatch``: each record is in the
    meta once (a meta is written, published and read once per job). Assembled around
    pydantic's own JSON of the record (the hot path of every result, cache hits
    included): the same document ``json.dumps`` of the dict would give. ``public``: that
    JSON, when the caller has it already."""
    status, exc_type = _CELERY_OUTCOME[result.state]
    if public is None:
        public = result.model_dump_json()
    done = datetime.fromtimestamp(result.finished_at, UTC).isoformat()
    head = (f'{{"status":"{status}","traceback":null,"children":[],"date_done":"{done}",'
            f'"task_id":{orjson.dumps(result.id).decode()},')
    if exc_type is None:
        return f'{head}"result":{public}}}'
    error = orjson.dumps({"exc_type": exc_type, "exc_module": "jobs.errors",
                          "exc_message": [result.error or result.state.value]}).decode()
    return f'{head}"result":{error},"promptbatch":{public}}}'


def result_from_meta(raw: str) -> JobResult:
    """Our result record from a stored Celery meta (``celery_meta``)."""
    meta = orjson.loads(raw)
    return JobResult.model_validate(meta["promptbatch"] if "promptbatch" in meta
                                    else meta["result"])

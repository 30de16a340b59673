"""The result as Celery's Redis backend stores it: what a Celery client reads, and ours."""

from __future__ import annotations

import json

from jobs.models import JobResult, JobState
from jobs.queue import celery_meta, result_from_meta


def test_a_succeeded_job_is_celerys_result_and_our_record_once() -> None:
    res = JobResult(id="j1", state=JobState.SUCCEEDED, text="Bonjour", created_at=1.0,
                    started_at=2.0, finished_at=3.5)
    raw = celery_meta(res)
    meta = json.loads(raw)
    assert meta["status"] == "SUCCESS" and meta["task_id"] == "j1"
    assert meta["result"]["text"] == "Bonjour"  # what AsyncResult.get() returns
    assert "promptbatch" not in meta and raw.count('"Bonjour"') == 1
    assert result_from_meta(raw) == res


def test_a_failed_job_is_celerys_exception_with_our_record_beside_it() -> None:
    res = JobResult(id="j2", state=JobState.FAILED, error="HTTP 500 from the provider",
                    finished_at=3.0)
    meta = json.loads(celery_meta(res))
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_message"] == ["HTTP 500 from the provider"]
    assert meta["promptbatch"]["error"] == "HTTP 500 from the provider"
    assert result_from_meta(celery_meta(res)) == res


def test_a_meta_written_by_an_earlier_version_still_reads() -> None:
    res = JobResult(id="j3", state=JobState.SUCCEEDED, text="ok", finished_at=1.0)
    old = json.loads(celery_meta(res))
    old["promptbatch"] = old["result"]  # earlier metas held the record twice
    assert result_from_meta(json.dumps(old)) == res

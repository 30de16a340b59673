"""The extraction benchmark on llama-server (``bench/llm_extraction.py``): its workload is
what it says (16 families of distinct documents behind one instruction and one schema
that a right answer fits), and its count of answers sees each outcome."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from jsonschema import Draft202012Validator

from bench import llm_extraction as bench
from jobs.models import JobRequest, JobResult, JobSpec, JobState, Usage
from scheduler.pool import FAMILY_LEVEL, PREFIX_LEVELS, prefix_signature


def text_of(job: dict[str, Any]) -> str:
    """The job's text as the scheduler reads it (what similarity and prefixes use)."""
    req = JobRequest(**job)
    return JobSpec(id="j", tenant="t", priority=req.priority, created_at=0.0,
                   provider="openai", model="m", messages=req.messages).text


def test_sixteen_families_of_distinct_documents_whose_right_records_fit_the_schema() -> None:
    jobs, families, expected = bench.workload(3)
    assert len(jobs) == len(families) == len(expected) == 48
    assert Counter(families) == dict.fromkeys(range(16), 3)
    texts = [text_of(job) for job in jobs]
    assert len(set(texts)) == 48
    validator = Draft202012Validator(bench.SCHEMA,
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    assert all(validator.is_valid(record) for record in expected)
    for job, family in zip(jobs, families, strict=True):
        assert job["response_format"] == bench.RESPONSE_FORMAT
        assert job["messages"][1]["content"].startswith(bench.family_text(family))


def test_the_instruction_opens_every_prompt_unless_the_source_is_named_first() -> None:
    """Where the scheduler sees prefix families (the first 256 characters): one family
    when the shared instruction comes first, one per source when a line names it."""
    def openings(layout: str) -> int:
        jobs, _, _ = bench.workload(2, layout=layout)
        return len({prefix_signature(text_of(j))[FAMILY_LEVEL] for j in jobs})

    assert len(bench.INSTRUCTION) > PREFIX_LEVELS[FAMILY_LEVEL]
    assert openings("instruction-first") == 1
    assert openings("source-first") == 16


def test_the_count_sees_valid_repaired_invalid_and_failed_answers() -> None:
    _, families, expected = bench.workload(1)
    good = expected[0]
    results = [
        JobResult(id="a", state=JobState.SUCCEEDED, text=json.dumps(good), parsed=good,
                  schema_retries=0, batch_id="b1", usage=Usage(prompt_tokens=100,
                                                                cached_tokens=60)),
        JobResult(id="b", state=JobState.SUCCEEDED, text=json.dumps(expected[1]),
                  parsed=expected[1], schema_retries=1, batch_id="b1"),
        JobResult(id="c", state=JobState.FAILED, text='{"total": -1}', schema_retries=1,
                  error_code="invalid_output", batch_id="b2"),
        JobResult(id="d", state=JobState.FAILED, error="provider down", batch_id="b2"),
        # A SUCCEEDED answer whose parsed value does not fit is not counted as valid.
        JobResult(id="e", state=JobState.SUCCEEDED, text='{"total": 3}', parsed={"total": 3},
                  schema_retries=0, batch_id="b2"),
    ]
    got = bench.check(results, families[:5], expected[:5])
    assert (got["valid"], got["first"], got["retried"]) == (2, 1, 2)
    assert (got["invalid_output"], got["other"]) == (1, 2)
    assert (got["prompt"], got["cached"]) == (100, 60)
    assert got["batches"] == 2
    assert got["fields right"] == 12  # the two valid answers, six fields each

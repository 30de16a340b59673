"""`promptbatch run` on extraction lines with one schema (real processes, simulated): every
SUCCEEDED output line holds a parsed value that validates; the answers simulated cuts
are asked again once, and those cut twice end FAILED invalid_output with their raw
answer; the run's summary agrees with the lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from bench.extraction import SCHEMA, generate
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LINES = 300


@pytest.mark.timeout(240)
def test_every_line_of_a_bulk_extraction_holds_a_value_that_validates(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    generate(src, LINES, schema=True)
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update(PROMPTBATCH_DATA_DIR=str(tmp_path / "var"), COLUMNS="200",
               PROMPTBATCH_SIMULATED_TIME_SCALE="0", PROMPTBATCH_SIMULATED_INVALID_RATE="0.2")
    done = subprocess.run([sys.executable, "-m", "promptbatch", "run", str(src), "--out",
                           str(out), "--provider", "simulated"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=220, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(LINES)]
    validator = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
    succeeded = [r for r in rows if r["state"] == "SUCCEEDED"]
    failed = [r for r in rows if r["state"] == "FAILED"]
    assert len(succeeded) + len(failed) == LINES
    for r in succeeded:
        assert validator.is_valid(r["parsed"]) and json.loads(r["text"]) == r["parsed"], r
    for r in failed:  # cut twice: the raw answer kept, the first validation error named
        assert r["error_code"] == "invalid_output" and r["parsed"] is None
        assert r["text"] and "content at $: not JSON" in r["error"]
    first = sum(1 for r in succeeded if r["schema_retries"] == 0)
    repaired = sum(1 for r in succeeded if r["schema_retries"] == 1)
    assert first + repaired == len(succeeded) and repaired > 0 and failed
    summary = re.search(r"valid at first answer / repaired / failed\s*\S\s*(\d+) / (\d+) / "
                        r"(\d+)", done.stdout)
    assert summary is not None, done.stdout
    assert tuple(map(int, summary.groups())) == (first, repaired, len(failed))


def summary_rows(stdout: str) -> dict[str, str]:
    """The rows of the summary table ``run`` prints: what -> value."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)]
        if len(cells) == 4 and cells[1]:
            rows[cells[1]] = cells[2]
    return rows


@pytest.mark.timeout(300)
def test_the_summary_of_a_resumed_run_counts_the_whole_files_results(tmp_path: Path) -> None:
    """Killed after its second chunk was submitted and run again, the run's summary
    counts every line's result, as the output file has them: jobs, states, checked
    answers, tokens cached and cost."""
    lines = 3_000
    src = tmp_path / "in.jsonl"
    generate(src, lines, schema=True)
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update(PROMPTBATCH_DATA_DIR=str(tmp_path / "var"), COLUMNS="200",
               PROMPTBATCH_SIMULATED_TIME_SCALE="0", PROMPTBATCH_SIMULATED_INVALID_RATE="0.2")
    argv = [sys.executable, "-m", "promptbatch", "run", str(src), "--out", str(out),
            "--provider", "simulated", "--window", "500"]

    def submitted() -> int:
        ledgers = list((tmp_path / "var" / "run").glob("**/submitted.tsv"))
        return sum(1 for _ in ledgers[0].open()) if ledgers else 0

    first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    poll(lambda: submitted() >= 2_000, timeout=180, interval=0.01,
         what="two chunks to be submitted", proc=first)
    first.kill()
    first.wait()
    assert submitted() < lines
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == lines
    summary = summary_rows(done.stdout)
    assert summary["jobs"] == str(lines), done.stdout
    assert 0 < int(summary["of them finished before this run resumed"]) < lines
    states = [sum(1 for r in rows if r["state"] == s)
              for s in ("SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED")]
    assert summary["succeeded / failed / expired / cancelled"] == " / ".join(map(str, states))
    first_ok = sum(1 for r in rows if r["state"] == "SUCCEEDED" and r["schema_retries"] == 0)
    repaired = sum(1 for r in rows if r["state"] == "SUCCEEDED" and r["schema_retries"])
    failed = sum(1 for r in rows if r["error_code"] == "invalid_output")
    assert summary["answers checked: valid at first answer / repaired / failed"] == \
        f"{first_ok} / {repaired} / {failed}"
    cached = sum(r["usage"]["cached_tokens"] for r in rows)
    prompt = sum(r["usage"]["prompt_tokens"] for r in rows)
    assert summary["prompt tokens cached"].startswith(f"{cached} of {prompt} ")
    cost = sum(r["usage"]["cost_usd"] for r in rows)
    shown = float(summary["cost"].lstrip("$").replace(",", ""))
    assert shown == pytest.approx(cost, rel=0.01), summary["cost"]

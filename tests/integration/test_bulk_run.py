"""`promptbatch run` on files where chunks and the window matter: killed at 60% and run
again, it finishes the rest without submitting a line twice (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LINES = 6_000


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update({"PROMPTBATCH_DATA_DIR": str(tmp_path / "var"),
                "PROMPTBATCH_ECHO_TEST_HOOKS": "1",
                "PROMPTBATCH_ECHO_CALL_LOG": str(tmp_path / "calls.jsonl")})
    return env


def _submitted(tmp_path: Path) -> int:
    ledgers = list((tmp_path / "var" / "run").glob("**/submitted.tsv"))
    return sum(1 for _ in ledgers[0].open()) if ledgers else 0


@pytest.mark.timeout(300)
def test_a_run_killed_at_sixty_percent_resumes_without_submitting_a_line_twice(
        tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i in range(LINES):
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"[echo:sleep=0.2] item {i}",
                                 "priority": "bulk"}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "promptbatch", "run", str(src), "--out", str(out),
            "--window", "1500"]
    first = subprocess.Popen(argv, cwd=tmp_path, env=_env(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll(lambda: _submitted(tmp_path) >= LINES * 6 // 10, timeout=180, interval=0.05,
         what="60% of the lines to be submitted", proc=first)
    first.kill()  # no warning; its stack is left running, holding the run's folder
    first.wait()
    assert _submitted(tmp_path) < LINES
    again = subprocess.run(argv, cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                           text=True, timeout=240, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    assert f"{LINES}/{LINES}" in again.stderr and "/?" not in again.stderr  # the count kept
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == list(range(1, LINES + 1))
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(LINES)]
    assert {r["state"] for r in rows} == {"SUCCEEDED"}
    # Every job the provider saw is one of the output's: no line became two jobs.
    called: set[str] = set()
    for line in (tmp_path / "calls.jsonl").read_text().splitlines():
        called.update(json.loads(line)["jobs"])
    assert called == {r["job_id"] for r in rows}
    # A finished run leaves no folder (the run folders' lock file stays, free).
    assert not [p for p in (tmp_path / "var" / "run").iterdir() if p.is_dir()]


@pytest.mark.timeout(400)
def test_a_run_with_skipped_lines_killed_twice_writes_each_line_once_in_order(
        tmp_path: Path) -> None:
    """Every fourth line invalid (--skip-invalid): their rows are spooled as the lines are
    read, and a SIGKILL right after a chunk is acknowledged loses the last of them (rows
    are buffered). Killed after the first and the second chunk, then run to the end, the
    output has exactly one whole JSON line per input line, in order."""
    lines = 3_000
    src = tmp_path / "in.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            fh.write(json.dumps({"id": f"q{i}", "prompt": "   " if i % 4 == 3 else
                                 f"[echo:sleep=0.2] item {i}"}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "promptbatch", "run", str(src), "--out", str(out),
            "--window", "300", "--skip-invalid"]
    for acknowledged in (1_000, 2_000):  # valid lines: chunks of 1,000 of them
        run = subprocess.Popen(argv, cwd=tmp_path, env=_env(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll(lambda n=acknowledged: _submitted(tmp_path) >= n, timeout=180,
             interval=0.01, what=f"{acknowledged} lines to be submitted", proc=run)
        run.kill()
        run.wait()
    done = subprocess.run(argv, cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == list(range(1, lines + 1))
    for i, row in enumerate(rows):
        if i % 4 == 3:
            assert row["state"] == "REJECTED" and "prompt" in row["error"], row
        else:
            assert (row["id"], row["state"]) == (f"q{i}", "SUCCEEDED"), row

"""`promptbatch submit` of the same file with another `--provider` is new work: new jobs
and their own results, never the first submit's (the API, or Redis and the store, real)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Settings
from jobs.store import JobStore
from tests.conftest import Procs, settings_env
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LINES = 12


def _file(tmp_path: Path) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"l{i}", "prompt": f"Line {i}"}) + "\n"
                           for i in range(LINES)), encoding="utf-8")
    return src


def _rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]


def _jobs_by_provider(settings: Settings) -> dict[str, int]:
    """What the job store holds: the side effect of each submit, counted where it lands."""
    from sqlalchemy import text

    store = JobStore(settings.database_url)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT provider, count(*) FROM jobs GROUP BY provider"))
            return {str(p): int(n) for p, n in rows}
    finally:
        store.close()


@pytest.mark.parametrize("through", ["api", "redis"])
def test_the_same_file_with_another_provider_makes_new_jobs_with_their_own_results(
        settings: Settings, procs: Procs, tmp_path: Path, through: str) -> None:
    from tests.integration.test_api import KEY_A, Api

    procs.scheduler()
    procs.worker(concurrency=1)
    src = _file(tmp_path)
    out = tmp_path / "out.jsonl"
    env = {**settings_env(settings), "PROMPTBATCH_API_KEY": KEY_A}
    api = Api(settings).start() if through == "api" else None
    try:
        where = ["--url", api.url] if api else []

        def submit(provider: str) -> list[dict[str, object]]:
            done = subprocess.run([sys.executable, "-m", "promptbatch", "submit", str(src),
                                   *where, "--out", str(out), "--provider", provider],
                                  env=env, capture_output=True, text=True, timeout=120,
                                  check=False)
            assert done.returncode == 0, done.stderr[-3000:]
            assert f"{LINES}/{LINES}" in done.stderr and "/?" not in done.stderr  # counted
            return _rows(out)

        echo = submit("echo")
        simulated = submit("simulated")
        again = submit("simulated")  # the same command again: the same jobs
    finally:
        if api:
            api.stop()
    assert [r["text"] for r in echo] == [f"echo: Line {i}" for i in range(LINES)]
    assert all(str(r["text"]).startswith("[sim-") for r in simulated), simulated[0]
    assert not {r["job_id"] for r in echo} & {r["job_id"] for r in simulated}
    assert [r["job_id"] for r in again] == [r["job_id"] for r in simulated]
    assert _jobs_by_provider(settings) == {"echo": LINES, "simulated": LINES}


def test_an_unfinished_submit_of_other_options_is_not_resumed_as_this_one(
        settings: Settings, procs: Procs, tmp_path: Path) -> None:
    """Interrupted with --provider echo, then run with --provider simulated: the state of
    the first is not taken for the second's (its lines would be skipped, their echo
    results written)."""
    from tests.integration.test_api import KEY_A, Api

    src = _file(tmp_path)
    out = tmp_path / "out.jsonl"
    env = {**settings_env(settings), "PROMPTBATCH_API_KEY": KEY_A}
    api = Api(settings).start()
    try:
        argv = [sys.executable, "-m", "promptbatch", "submit", str(src), "--url", api.url,
                "--out", str(out), "--chunk", "4"]
        first = subprocess.Popen([*argv, "--provider", "echo"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        ledger = Path(f"{out}.promptbatch-state") / "submitted.tsv"
        poll(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 4,
             timeout=60, what="a chunk to be acknowledged", proc=first)
        os.killpg(first.pid, signal.SIGKILL)  # no workers yet: it cannot have finished
        first.wait()
        procs.scheduler()
        procs.worker(concurrency=1)
        done = subprocess.run([*argv, "--provider", "simulated"], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        api.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "other work" in " ".join(done.stderr.split())
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"l{i}" for i in range(LINES)]
    assert all(str(r["text"]).startswith("[sim-") for r in rows), rows[0]


@pytest.mark.parametrize("through", ["api", "redis"])
def test_a_line_refused_for_its_own_key_is_not_told_to_run_again(
        settings: Settings, tmp_path: Path, through: str) -> None:
    """A line whose own idempotency key was used for another request is refused: running
    the same command again cannot help, so the message does not say it would."""
    from tests.integration.test_api import KEY_A, Api

    env = {**settings_env(settings), "PROMPTBATCH_API_KEY": KEY_A}
    api = Api(settings).start() if through == "api" else None
    try:
        where = ["--url", api.url] if api else []
        answers = []
        for n, prompt in enumerate(("first", "another")):
            src = tmp_path / f"in-{n}.jsonl"
            src.write_text(json.dumps({"prompt": prompt, "idempotency_key": "mine"}) + "\n")
            answers.append(subprocess.run(
                [sys.executable, "-m", "promptbatch", "submit", str(src), *where],
                env=env, capture_output=True, text=True, timeout=120, check=False))
    finally:
        if api:
            api.stop()
    assert answers[0].returncode == 0, answers[0].stderr[-3000:]
    err = " ".join(answers[1].stderr.split())
    assert answers[1].returncode == 1 and "'mine' was already used" in err, err
    assert "run the same command again" not in err

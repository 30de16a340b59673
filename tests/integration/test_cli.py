"""The command line: `promptbatch run` on a local stack, and refusing bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path, timeout: float = 180, **env: str,
            ) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    full_env["PROMPTBATCH_DATA_DIR"] = str(cwd / "var")
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "promptbatch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_a_bad_line_is_reported_by_number_and_field_and_nothing_runs(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n\n{"prompt": "x", "priority": "urgent"}\n'
                   '{"messages": []}\nnot json\n', encoding="utf-8")
    done = run_cli("run", str(src), "--out", str(tmp_path / "out.jsonl"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    assert "line 3" in err and "priority" in err
    assert "line 4" in err and "messages" in err
    assert "line 5" in err and "not valid JSON" in err
    assert "nothing was submitted" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "var").exists(), "a stack was started for an invalid file"


@pytest.mark.slow
@pytest.mark.integration
def test_run_writes_one_result_per_line_in_input_order_and_a_summary(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [{"id": f"q{i}", "prompt": f"Name a colour for item {i}",
              "priority": ["critical", "normal", "bulk"][i % 3]} for i in range(40)]
    lines.insert(5, {"prompt": "   "})  # skipped with --skip-invalid, reported in place
    src.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    done = run_cli("run", str(src), "--out", str(out), "--workers", "2", "--skip-invalid",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 41
    assert [r["line"] for r in rows] == list(range(1, 42))
    assert rows[5]["state"] == "REJECTED" and "prompt" in rows[5]["error"]
    good = [r for r in rows if r["state"] != "REJECTED"]
    assert [r["id"] for r in good] == [f"q{i}" for i in range(40)]
    assert all(r["state"] == "SUCCEEDED" for r in good)
    assert good[3]["text"] == "echo: Name a colour for item 3"
    for field in ("usage", "batch_id", "batch_size", "queued_ms", "latency_ms", "error"):
        assert field in good[0]
    # The file was counted first: the bars read out of the 40 jobs it makes, never "/?".
    progress = " ".join(done.stderr.split())
    assert "submitted" in progress and "40/40" in progress and "/?" not in progress
    summary = done.stdout
    for label in ("jobs", "batches", "mean batch size", "mean similarity", "jobs/s",
                  "latency critical", "latency bulk", "failed"):
        assert label in summary


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("sigint_ignored_at_start", [False, True])
def test_ctrl_c_stops_everything_the_run_started(tmp_path: Path,
                                                 sigint_ignored_at_start: bool) -> None:
    """Also when the run starts with SIGINT ignored, as a background job of a
    non-interactive shell does."""
    import signal

    import psutil

    from tests.helpers import poll

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Long task {i} " * 50}) + "\n"
                           for i in range(2000)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env["PROMPTBATCH_DATA_DIR"] = str(tmp_path / "var")
    proc = subprocess.Popen([sys.executable, "-m", "promptbatch", "run", str(src), "--provider",
                             "simulated", "--workers", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=ignore_sigint if sigint_ignored_at_start else None)
    me = psutil.Process(proc.pid)
    # Running: the server, the scheduler and a worker with its pool are all up.
    children = poll(lambda: (c := me.children(recursive=True)) and len(c) >= 4 and c,
                    timeout=60, what="the local stack to start", proc=proc)
    def worker_ready() -> bool:
        logs = list((tmp_path / "var" / "run").glob("*/worker.log"))
        return bool(logs) and b"ready" in logs[0].read_bytes()

    poll(worker_ready, timeout=60, what="the worker to be ready", proc=proc)
    children = me.children(recursive=True)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"still running after Ctrl-C: {[p.cmdline()[:3] for p in alive]}"


@pytest.mark.parametrize(("value", "words"), [
    ("errors_high", ["PROMPTBATCH_ANOMALY_ACTIONS_OFF", "not valid JSON", "a JSON list",
                     '["errors_high"]']),
    ('["bogus"]', ["PROMPTBATCH_ANOMALY_ACTIONS_OFF", "item 0", "'errors_high'"]),
])
def test_a_bad_setting_is_named_by_its_variable_with_what_it_takes(
        tmp_path: Path, value: str, words: list[str]) -> None:
    done = run_cli("status", cwd=tmp_path, PROMPTBATCH_ANOMALY_ACTIONS_OFF=value)
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    for word in words:
        assert word in err, err
    assert "Traceback" not in err and "errors.pydantic.dev" not in err, err


def test_migrate_against_a_database_nobody_serves_names_the_setting_and_hides_the_password(
        tmp_path: Path) -> None:
    from promptbatch.embedded import free_port

    url = f"postgresql+psycopg://pb:s3cret-pw@127.0.0.1:{free_port()}/jobs"
    done = run_cli("migrate", cwd=tmp_path, PROMPTBATCH_DATABASE_URL=url)
    assert done.returncode == 2, done.stderr
    said = " ".join((done.stdout + done.stderr).split())
    assert "cannot reach the job store at" in said and "PROMPTBATCH_DATABASE_URL" in said, said
    assert "127.0.0.1" in said and "s3cret-pw" not in said, said
    assert "Traceback" not in said and "sqlalche.me" not in said, said

"""A second `promptbatch run` on the same data folder while one is going (of the same file
or of another) refuses, naming the first, and the first finishes untouched; a run whose
server dies says so in one line (real processes)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Long enough for a second command to start and refuse while the first waits on it.
SLEEP_S = 8


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update({"PROMPTBATCH_DATA_DIR": str(tmp_path / "var"),
                "PROMPTBATCH_ECHO_TEST_HOOKS": "1"})
    return env


def _file(path: Path, lines: int, sleep: float) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"[echo:sleep={sleep}] {i}"})
                            + "\n" for i in range(lines)), encoding="utf-8")
    return path


def _start(tmp_path: Path, src: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "promptbatch", "run", str(src), "--out",
                             str(out), "--workers", "1"], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _submitted(tmp_path: Path) -> bool:
    return any(p.stat().st_size for p in (tmp_path / "var" / "run").glob("*/output/submitted.tsv"))


def _kill_family(proc: subprocess.Popen[str]) -> None:
    """After a failure: the run and every process of its stack, whatever state they are
    in (a test leaves nothing running)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.kill()
    proc.wait()
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(family, timeout=30)


def _again(tmp_path: Path, src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "promptbatch", "run", str(src), "--out",
                           str(out), "--workers", "1"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("same_file", [True, False], ids=["same-file", "another-file"])
def test_a_second_run_refuses_naming_the_first_which_finishes_untouched(
        tmp_path: Path, same_file: bool) -> None:
    src = _file(tmp_path / "first.jsonl", 20, SLEEP_S)
    out = tmp_path / "first-out.jsonl"
    first = _start(tmp_path, src, out)
    try:
        poll(lambda: _submitted(tmp_path), timeout=90, what="the first run to submit",
             proc=first)  # type: ignore[arg-type]
        stack = psutil.Process(first.pid).children(recursive=True)
        other = src if same_file else _file(tmp_path / "other.jsonl", 3, 0)
        second = _again(tmp_path, other, tmp_path / "other-out.jsonl")
        assert first.poll() is None, "the first run ended before the second was tried"
        err = " ".join(second.stderr.split())
        assert second.returncode == 2, err
        assert "already going" in err and f"pid {first.pid}" in err
        assert str(src.resolve()) in err
        assert not (tmp_path / "other-out.jsonl").exists()
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stack), \
            "the second run stopped processes of the first"
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            _kill_family(first)
    assert first.returncode == 0, stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(20)]
    assert {r["state"] for r in rows} == {"SUCCEEDED"}
    # Its folder went with it; the lock file of the run folders stays, free.
    assert [p.name for p in (tmp_path / "var" / "run").iterdir()] == ["run.lock"]
    # Now free: the other file runs.
    if not same_file:
        done = _again(tmp_path, tmp_path / "other.jsonl", tmp_path / "other-out.jsonl")
        assert done.returncode == 0, done.stderr[-3000:]
        assert len((tmp_path / "other-out.jsonl").read_text().splitlines()) == 3


@pytest.mark.timeout(180)
def test_a_run_whose_server_dies_says_so_in_one_line(tmp_path: Path) -> None:
    src = _file(tmp_path / "in.jsonl", 20, SLEEP_S)
    run = _start(tmp_path, src, tmp_path / "out.jsonl")
    try:
        poll(lambda: _submitted(tmp_path), timeout=90, what="the run to submit",
             proc=run)  # type: ignore[arg-type]
        server = [p for p in psutil.Process(run.pid).children(recursive=True)
                  if "valkey" in p.name() or "redis" in p.name()]
        assert len(server) == 1, server
        server[0].kill()
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            _kill_family(run)
    assert run.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "lost the local stack's Redis server" in " ".join(stderr.split())
    assert "run the same command again to resume" in " ".join(stderr.split())

"""What weeks of running bring: a batch that waited long in the broker runs once; `up`
stops warm under load and refuses a second `up` on its data (real processes, signals and
servers)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis

from config import keys
from config.settings import Settings
from producers.client import Client
from promptbatch.embedded import free_port
from tests.conftest import Procs
from tests.helpers import poll, provider_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

#: In flight for at most 16 + 15 s before the scheduler takes a batch for lost.
SHORT = {"PROMPTBATCH_VISIBILITY_TIMEOUT_S": "16", "PROMPTBATCH_TASK_TIME_LIMIT_S": "15",
         "PROMPTBATCH_RECONCILE_INTERVAL_S": "1", "PROMPTBATCH_RECONCILE_GRACE_S": "0",
         "PROMPTBATCH_LEASE_TTL_S": "2"}


def test_a_batch_that_waited_in_the_broker_and_runs_past_the_cutoff_runs_once(
        settings: Settings, procs: Procs, r: redis.Redis) -> None:
    procs.scheduler(**SHORT)
    beating = threading.Event()
    beating.set()

    def heartbeat() -> None:  # a worker the scheduler counts, that consumes nothing
        while beating.is_set():
            r.hset(keys.WORKERS, "busy@elsewhere", json.dumps(
                {"concurrency": 4, "ts": time.time(), "pid": 0}))
            time.sleep(0.5)  # the heartbeat's own period, not a wait for work
        r.hdel(keys.WORKERS, "busy@elsewhere")

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        with Client(settings) as client:
            job = client.submit("[echo:sleep=9] slow to start, slow to run")
            member = poll(lambda: r.zrange(keys.INFLIGHT, 0, -1), timeout=30,
                          what="the batch to be claimed and sent")[0]
            claimed_at = float(r.zscore(keys.INFLIGHT, member) or 0)
            cutoff = claimed_at + 16 + 15
            # The batch waits in the broker until a worker comes, 22 s after its claim: it
            # starts before the cutoff and runs (9 s) past it.
            poll(lambda: time.time() >= claimed_at + 22, timeout=30, interval=0.1,
                 what="the batch to have waited")
            beating.clear()
            procs.worker(2, **SHORT)
            result = client.result(job, timeout=60)
            assert result.started_at is not None and result.started_at < cutoff
            assert result.finished_at > cutoff, "the batch did not run past the cutoff"
            # A reconciler pass that began after the cutoff has looked at the job.
            poll(lambda: float(r.hget(keys.RECONCILE, "started") or 0) > result.finished_at
                 and r.hget(keys.RECONCILE, "pass") is None, timeout=30, interval=0.1,
                 what="a reconciler pass after the batch")
        calls = provider_calls(settings.echo_call_log)
        assert calls[job] == 1, "the running batch was taken for lost and sent again"
    finally:
        beating.clear()
        thread.join(5)


def _start_up(data: Path, out: Path, env: dict[str, str],
              *extra: str) -> subprocess.Popen[bytes]:
    with out.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "promptbatch", "up", "--no-flower",
                                 "--port", str(free_port()), *extra], cwd=data.parent,
                                env=env, stdout=fh, stderr=subprocess.STDOUT)


def _up_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update({"PROMPTBATCH_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1",
                "PROMPTBATCH_UP_SCHEDULER_METRICS_PORT": str(free_port()),
                "PROMPTBATCH_UP_WORKER_METRICS_PORT": str(free_port()), **extra})
    return env


def _ready(proc: subprocess.Popen[bytes], out: Path) -> None:
    poll(lambda: "Other terminals" in out.read_text(errors="replace"), timeout=120,
         what="promptbatch up to print its endpoints", proc=proc)


def _settings_of(tmp_path: Path, settings: Settings) -> Settings:
    env = dict(re.findall(r"export (\w+)='([^']*)'",
                          (tmp_path / "data" / "up" / "up.env").read_text()))
    return settings.model_copy(update={"redis_url": env["PROMPTBATCH_REDIS_URL"],
                                       "database_url": env["PROMPTBATCH_DATABASE_URL"]})


@pytest.mark.timeout(300)
def test_ctrl_c_of_up_under_load_lets_running_batches_finish_and_pays_once(
        tmp_path: Path, settings: Settings) -> None:
    calls = tmp_path / "calls.jsonl"
    env = _up_env(tmp_path, PROMPTBATCH_ECHO_TEST_HOOKS="1",
                  PROMPTBATCH_ECHO_CALL_LOG=str(calls))
    up = _start_up(tmp_path / "data", tmp_path / "first.out", env, "--workers", "2")
    try:
        _ready(up, tmp_path / "first.out")
        s = _settings_of(tmp_path, settings)
        with Client(s) as client:
            ids = client.submit_many({"prompt": f"[echo:sleep=0.5] job {i}"}
                                     for i in range(1500))
            poll(lambda: sum(provider_calls(calls).values()) >= 100, timeout=60,
                 what="batches to be running")
            up.send_signal(signal.SIGINT)  # Ctrl-C, with batches running
            assert up.wait(60) == 0
            called = set(provider_calls(calls))
            # Every batch that had started finished: each job called has its result.
            stored = client.store.get_many(sorted(called))
            assert {s.state.value for s in stored.values()} == {"SUCCEEDED"}
            assert len(called) < len(ids), "the load was over before the Ctrl-C"
        up = _start_up(tmp_path / "data", tmp_path / "second.out", env, "--workers", "2")
        _ready(up, tmp_path / "second.out")
        with Client(_settings_of(tmp_path, settings)) as client:
            assert len(list(client.results(ids, timeout=180))) == len(ids)
        counted = provider_calls(calls)
        assert set(counted) == set(ids)
        twice = [j for j, n in counted.items() if n > 1]
        assert not twice, f"{len(twice)} jobs were sent to the provider twice"
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(60)


@pytest.mark.timeout(300)
def test_a_second_up_on_the_same_data_refuses_until_the_first_is_gone(tmp_path: Path) -> None:
    env = _up_env(tmp_path)
    first = _start_up(tmp_path / "data", tmp_path / "first.out", env)
    try:
        _ready(first, tmp_path / "first.out")
        env_file = tmp_path / "data" / "up" / "up.env"
        before = env_file.read_text()
        second = subprocess.run([sys.executable, "-m", "promptbatch", "up", "--no-flower",
                                 "--port", str(free_port())], env=env, capture_output=True,
                                text=True, timeout=60, check=False)
        assert second.returncode != 0
        assert "already running" in second.stderr and f"pid {first.pid}" in second.stderr, \
            second.stderr
        assert env_file.read_text() == before  # nothing of the first was touched
        # A crashed up: its processes still run on the data, and still hold it.
        family = psutil.Process(first.pid).children(recursive=True)
        first.kill()
        first.wait(30)
        third = subprocess.run([sys.executable, "-m", "promptbatch", "up", "--no-flower",
                                "--port", str(free_port())], env=env, capture_output=True,
                               text=True, timeout=60, check=False)
        assert third.returncode != 0 and "still run" in third.stderr, third.stderr
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(family, timeout=30)
        # Once they are gone, nothing is left stuck: the next up starts.
        fourth = _start_up(tmp_path / "data", tmp_path / "fourth.out", env)
        _ready(fourth, tmp_path / "fourth.out")
        fourth.send_signal(signal.SIGINT)
        assert fourth.wait(60) == 0
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)
            first.wait(60)

"""Flower, started against our broker, lists our worker and the process_batch tasks; a
batch with failed jobs reads as failed, with its counts."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from config import keys
from config.settings import Settings
from jobs.models import JobState
from jobs.queue import connect
from producers.client import Client
from promptbatch.embedded import free_port
from tests.conftest import Procs, settings_env
from tests.helpers import poll, provider_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_flower_lists_the_worker_and_process_batch_tasks(settings: Settings, procs: Procs,
                                                         tmp_path: Path) -> None:
    procs.scheduler()
    procs.worker(concurrency=1, name="flowerseen")
    port = free_port()
    env = settings_env(settings, FLOWER_UNAUTHENTICATED_API="true")
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                               f"--port={port}", "--address=127.0.0.1"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        poll(up, timeout=60, what="Flower to answer", proc=flower)
        # Flower answers before its event receiver has subscribed: the events of a task
        # run in that moment are not seen (a task then shows without a name). Each round
        # runs a batch, until one is listed with its name.
        rounds = itertools.count()
        with Client(settings) as client:

            def seen() -> dict[str, object] | None:
                r = next(rounds)  # new prompts each round: never answered from the cache
                ids = client.submit_many({"prompt": f"Flower check {r}.{i}"} for i in range(10))
                list(client.results(ids, timeout=60))
                workers = httpx.get(f"{base}/api/workers?refresh=1", timeout=10).json()
                tasks = httpx.get(f"{base}/api/tasks", timeout=10).json()
                names = {t.get("name") for t in tasks.values()}
                ok = any(w.startswith("flowerseen@") for w in workers)
                return tasks if ok and "promptbatch.process_batch" in names else None

            tasks = poll(seen, timeout=60, interval=0.5, what="Flower to list worker and tasks")
        assert any(t.get("state") == "SUCCESS" for t in tasks.values())  # type: ignore[attr-defined]
        # The Broker tab: the class queues and their lengths, read from Redis.
        queues = httpx.get(f"{base}/api/queues/length", timeout=10)
        assert queues.status_code == 200, queues.text
        names = {q["name"] for q in queues.json()["active_queues"]}
        assert {"pb.critical", "pb.normal", "pb.bulk"} <= names
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(15)
        log.close()


def test_a_batch_whose_jobs_failed_reads_as_failed_with_its_counts(
        settings: Settings, procs: Procs, tmp_path: Path) -> None:
    # Each job sleeps past the task's soft time limit (1 s): its batch fails it.
    limits = {"PROMPTBATCH_TASK_TIME_LIMIT_S": "6"}
    procs.scheduler(**limits)
    procs.worker(concurrency=1, name="flowerfail", **limits)
    port = free_port()
    env = settings_env(settings, FLOWER_UNAUTHENTICATED_API="true")
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                               f"--port={port}", "--address=127.0.0.1"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        poll(lambda: _up(base), timeout=60, what="Flower to answer", proc=flower)
        rounds = itertools.count()
        jobs: list[str] = []
        with Client(settings) as client:

            def failed_batch() -> dict[str, object] | None:
                # A job of its own each round (Flower may miss the first round's events).
                job = client.submit(f"[echo:sleep=3] Flower fails {next(rounds)}")
                jobs.append(job)
                result = client.result(job, timeout=60)
                assert result.state is JobState.FAILED and "time limit" in (result.error or "")
                tasks = httpx.get(f"{base}/api/tasks", params={"state": "FAILURE"},
                                  timeout=10).json()
                return next((t for t in tasks.values()
                             if t.get("name") == "promptbatch.process_batch"), None)

            task = poll(failed_batch, timeout=90, interval=0.5,
                        what="Flower to list a failed batch under FAILURE")
        assert task["state"] == "FAILURE"
        assert "1 of 1 jobs failed (the task's time limit)" in str(task.get("exception"))
        # Its message was acknowledged: nothing waits in the broker or runs again.
        r = connect(settings.redis_url)
        assert all(r.llen(q) == 0 for q in keys.QUEUES)
        assert not r.hlen("unacked")  # kombu's hash of delivered, unacknowledged messages
        assert provider_calls(settings.echo_call_log) == Counter(jobs)
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(15)
        log.close()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

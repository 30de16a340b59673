"""Scenario 20: the compose topology as processes on loopback, run as the image runs it.

Redis with a password and AOF, PostgreSQL, `promptbatch migrate`, the API with two
uvicorn workers, two schedulers (one active, one standby), two workers of two slots each
and Flower behind basic auth. 20,000 jobs arrive through the HTTP API from four client
threads (four tenants, mixed classes); meanwhile the active scheduler and one worker are
SIGKILLed and restarted. Every job ends in exactly one final state, recorded in
PostgreSQL and in the result backend; the standby's takeover time is printed.

The processes run with ``PROMPTBATCH_DEPLOY_PYTHON`` when set: ``.ci/run`` points it at a
fresh virtual environment holding only the wheel with the ``postgres`` extra, as the
Dockerfile installs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from config import keys
from jobs.store import JobStore
from promptbatch.embedded import EmbeddedRedis, free_port
from tests.helpers import poll
from tests.pg import PostgresServer, create_database
from tests.rabbit import RabbitServer
from tests.rabbit import bindir as rabbit_bindir

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults, pytest.mark.load]

PYTHON = os.environ.get("PROMPTBATCH_DEPLOY_PYTHON", sys.executable)
JOBS = 20_000
CLIENTS = 4
CLASSES = ("critical", "high", "normal", "low", "bulk")


class Topology:
    """The deployment's processes, each with its own log."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.cwd = logs  # not the repository: the processes import what is installed
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([PYTHON, "-m", *argv], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=self.cwd)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logs.glob("*.log")))


def lease_pid(r: redis.Redis) -> int | None:
    holder = r.get(keys.SCHEDULER_LEASE)
    return int(str(holder).split(":")[1]) if holder else None


@pytest.mark.timeout(900)
@pytest.mark.parametrize("broker", ["redis", pytest.param("rabbitmq", marks=pytest.mark.skipif(
    rabbit_bindir() is None, reason="RabbitMQ is not installed here (apt-get install "
    "rabbitmq-server; .ci/run installs it)"))])
def test_20_the_compose_topology_survives_a_scheduler_and_a_worker_killed_under_load(
        tmp_path: Path, broker: str) -> None:
    pg = PostgresServer().start()
    server = EmbeddedRedis(tmp_path / "redis", password="deploy-secret").start()
    rabbit = RabbitServer().start() if broker == "rabbitmq" else None
    tenants = {f"key-{i}": f"tenant-{i}" for i in range(CLIENTS)}
    api_port, flower_port = free_port(), free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update({
        "PROMPTBATCH_REDIS_URL": server.url,
        "PROMPTBATCH_DATABASE_URL": create_database(pg.admin_url),
        "PROMPTBATCH_API_KEYS": json.dumps(tenants),
        "PROMPTBATCH_DATA_DIR": str(tmp_path / "data"),
        "PROMPTBATCH_MAX_PENDING_PER_TENANT": str(JOBS),
        "PROMPTBATCH_LEASE_TTL_S": "2", "PROMPTBATCH_RECONCILE_INTERVAL_S": "10",
        "PROMPTBATCH_VISIBILITY_TIMEOUT_S": "20", "PROMPTBATCH_TASK_TIME_LIMIT_S": "15",
        "PROMPTBATCH_ECHO_CALL_LOG": str(tmp_path / "calls.jsonl"),
        "PYTHONUNBUFFERED": "1"})
    if rabbit is not None:
        env["PROMPTBATCH_BROKER_URL"] = rabbit.vhost()
    top = Topology(env, logs)
    r = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        migrated = subprocess.run([PYTHON, "-m", "promptbatch", "migrate"], env=env,
                                  cwd=logs, capture_output=True, text=True, timeout=120,
                                  check=False)
        assert migrated.returncode == 0, migrated.stderr
        top.start("api", "promptbatch", "api", "--port", str(api_port), "--workers", "2")
        first = top.start("scheduler-a", "promptbatch", "scheduler")
        poll(lambda: lease_pid(r) == first.pid, timeout=60, what="the first scheduler")
        top.start("scheduler-b", "promptbatch", "scheduler")
        for name in ("worker-a", "worker-b"):
            top.start(name, "promptbatch", "worker", "-c", "2", "--name", name,
                      "--loglevel", "warning")
        top.start("flower", "celery", "-A", "workers.app", "flower", f"--port={flower_port}",
                  "--address=127.0.0.1", "--basic_auth=ops:deploy-flower")
        api = f"http://127.0.0.1:{api_port}"
        poll(lambda: _answers(f"{api}/readyz") == 200, timeout=90, what="the API")
        poll(lambda: r.hlen(keys.WORKERS) == 2, timeout=90, what="both workers")
        accepted: dict[str, list[str]] = {}

        def client(key: str) -> None:
            ids: list[str] = []
            with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"},
                              timeout=60) as http:
                for start in range(0, JOBS // CLIENTS, 500):
                    jobs = [{"prompt": f"{tenants[key]} ticket {start + i}: route it",
                             "priority": CLASSES[(start + i) % 5]} for i in range(500)]
                    resp = http.post("/v1/jobs", json={"jobs": jobs})
                    assert resp.status_code == 201, resp.text
                    ids += resp.json()["ids"]
            accepted[key] = ids

        threads = [threading.Thread(target=client, args=(k,)) for k in tenants]
        for t in threads:
            t.start()
        store = JobStore(env["PROMPTBATCH_DATABASE_URL"])
        poll(lambda: store.count_by_state().get("SUCCEEDED", 0) >= JOBS // 5, timeout=300,
             interval=0.5, what="a fifth of the jobs to finish")
        # Kill the active scheduler and a worker mid-run; measure the standby's takeover.
        active = next(n for n, p in top.procs.items()
                      if n.startswith("scheduler") and p.pid == lease_pid(r))
        killed_pid = top.procs[active].pid
        # The killed worker's processes: only batches they were running may run twice.
        lost_pids = {top.procs["worker-a"].pid} | {
            p.pid for p in psutil.Process(top.procs["worker-a"].pid).children(recursive=True)}
        killed_at = time.monotonic()
        top.kill(active)
        top.kill("worker-a")
        poll(lambda: lease_pid(r) not in (None, killed_pid), timeout=60, interval=0.05,
             what="the standby to take over")
        takeover = time.monotonic() - killed_at
        top.start(active + "-again", "promptbatch", "scheduler")
        top.start("worker-a-again", "promptbatch", "worker", "-c", "2", "--name",
                  "worker-a-again", "--loglevel", "warning")
        for t in threads:
            t.join(300)
        ids = [i for key in tenants for i in accepted[key]]
        assert len(ids) == len(set(ids)) == JOBS
        poll(lambda: store.count_by_state() == {"SUCCEEDED": JOBS}, timeout=600, interval=1,
             what="every job to succeed, once, in PostgreSQL")
        # In the result backend too: a result that a killed worker stored only in SQL
        # gets there when its batch is delivered again (or the reconciler passes).
        poll(lambda: all(all(r.mget([keys.celery_result(i) for i in ids[start:start + 5000]]))
                         for start in range(0, JOBS, 5000)),
             timeout=150, interval=1, what="every result in the result backend")
        store.close()
        # Provider calls, counted where they happen: every job called; a job called
        # twice only if the worker that was killed had it in hand.
        calls: dict[str, list[int]] = {}
        for line in (tmp_path / "calls.jsonl").read_text().splitlines():
            entry = json.loads(line)
            for job_id in entry["jobs"]:
                calls.setdefault(job_id, []).append(entry["pid"])
        assert set(calls) == set(ids)
        again = {j: pids for j, pids in calls.items() if len(pids) > 1}
        assert all(set(pids[:-1]) <= lost_pids for pids in again.values()), \
            "a job was called twice though no worker that had it was killed"
        print(f"\n{len(again)} jobs called twice, all held by the killed worker")
        assert _answers(f"http://127.0.0.1:{flower_port}/") == 401
        assert _answers(f"http://127.0.0.1:{flower_port}/", ("ops", "deploy-flower")) == 200
        print(f"\nstandby scheduler took over {takeover:.2f} s after the active one was "
              f"killed (lease TTL 2 s)")
        assert takeover < 10
    except BaseException:
        print(top.tail())
        raise
    finally:
        top.stop()
        r.close()
        server.stop()
        pg.stop()
        if rabbit is not None:
            rabbit.stop()


def _answers(url: str, auth: tuple[str, str] | None = None) -> int | None:
    try:
        return httpx.get(url, auth=auth, timeout=5).status_code
    except httpx.HTTPError:
        return None

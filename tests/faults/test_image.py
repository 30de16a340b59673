"""Scenario 21: the image, run as a user runs it.

``scripts/build-image.sh`` builds the image (or finds it built from the same inputs);
then ``promptbatch migrate``, the API, the scheduler and two workers run as containers of
it (podman, the host's network) against a Valkey and a PostgreSQL on loopback, their
addresses and the API keys passed as secret files (``PROMPTBATCH_<NAME>_FILE``) as
``compose.yaml`` passes them. 500 jobs arrive through the API; each container's own
HEALTHCHECK reports healthy; one worker container gets a SIGTERM while it runs a batch,
and that batch finishes in it before it exits. Every job ends SUCCEEDED, once: rows in
PostgreSQL, keys in the result backend and calls at the provider (the workers' call logs,
mounted from here) are counted.

Skipped where podman, buildah or runc is missing, unless ``PROMPTBATCH_TEST_IMAGE_REQUIRED``
is set (``.ci/run`` sets it: there the test must run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from config import keys
from jobs.store import JobStore
from promptbatch.embedded import EmbeddedRedis, free_port
from tests.helpers import poll
from tests.pg import PostgresServer, create_database

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults, pytest.mark.load]

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "podman" / "containers.conf"
JOBS = 500
SLOW = 12  # of them hold their batch 4 s: a batch is running when the SIGTERM comes
CLASSES = ("critical", "high", "normal", "low", "bulk")
TOOLS = ("podman", "buildah", "runc")
SITE = "/opt/promptbatch/lib/python3.11/site-packages"


def _missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _skip_unless_tools() -> None:
    missing = _missing_tools()
    if not missing:
        return
    reason = (f"{', '.join(missing)} not installed (apt-get install podman buildah runc "
              "debootstrap; .ci/run installs them)")
    if os.environ.get("PROMPTBATCH_TEST_IMAGE_REQUIRED"):
        pytest.fail(reason)
    pytest.skip(reason)


def build_image() -> str:
    """The image of this checkout (built, or reused when its inputs did not change)."""
    done = subprocess.run([str(ROOT / "scripts" / "build-image.sh")], capture_output=True,
                          text=True, timeout=1500, check=False,
                          env={**os.environ, "CONTAINERS_CONF": str(CONF)})
    assert done.returncode == 0, f"build-image.sh failed:\n{done.stderr[-4000:]}"
    return done.stdout.strip().splitlines()[-1]


class Containers:
    """Containers of one image on the host's network, named apart from any other run."""

    def __init__(self, image: str, secrets: Path) -> None:
        self.image = image
        self.secrets = secrets
        self.prefix = f"pb-test-{uuid.uuid4().hex[:8]}-"
        self.names: list[str] = []
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONF)}

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], capture_output=True, text=True,
                              timeout=timeout, check=False, env=self.env)

    def _argv(self, name: str, env: dict[str, str], mounts: dict[Path, str]) -> list[str]:
        argv = ["run", "--name", self.prefix + name, "--network", "host",
                "--hostname", self.prefix + name,
                "-v", f"{self.secrets}:/run/secrets:ro"]
        for source, target in mounts.items():
            argv += ["-v", f"{source}:{target}"]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        return argv

    def once(self, name: str, *command: str,
             env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """Run ``command`` to its end (a one-shot step such as migrate)."""
        return self.podman(*self._argv(name, env, {}), "--rm", self.image, *command,
                           timeout=180)

    def start(self, name: str, *command: str, env: dict[str, str],
              mounts: dict[Path, str] | None = None) -> str:
        self.names.append(self.prefix + name)
        done = self.podman(*self._argv(name, env, mounts or {}), "--detach", self.image,
                           *command)
        assert done.returncode == 0, f"podman run {name}: {done.stderr}"
        return self.prefix + name

    def healthy(self, name: str) -> bool:
        """The image's HEALTHCHECK, run now (no systemd here to run it on its timer)."""
        return self.podman("healthcheck", "run", name, timeout=60).returncode == 0

    def state(self, name: str) -> dict[str, Any]:
        done = self.podman("inspect", "--format", "{{json .State}}", name)
        assert done.returncode == 0, done.stderr
        state: dict[str, Any] = json.loads(done.stdout)
        return state

    def logs(self, name: str) -> str:
        done = self.podman("logs", name)
        return done.stdout + done.stderr

    def tail(self) -> str:
        return "\n".join(f"--- {n}\n{self.logs(n)[-3000:]}" for n in self.names)

    def remove_all(self) -> None:
        if self.names:
            self.podman("rm", "--force", "--time", "0", *self.names)


def _write_secrets(folder: Path, values: dict[str, str]) -> None:
    folder.mkdir(mode=0o755)
    for name, value in values.items():  # the image's user (uid 10001) reads them
        (folder / name).write_text(value + "\n")
        (folder / name).chmod(0o644)


def _calls(logs: dict[str, Path]) -> dict[str, Counter[str]]:
    """Provider calls per job, per worker container (each worker's own call log)."""
    calls: dict[str, Counter[str]] = {}
    for name, path in logs.items():
        calls[name] = Counter()
        if path.exists():
            for line in path.read_text().splitlines():
                calls[name].update(json.loads(line)["jobs"])
    return calls


def _batches(path: Path) -> list[list[str]]:
    return [json.loads(line)["jobs"] for line in path.read_text().splitlines()] \
        if path.exists() else []


def _unix(rfc3339: str) -> float:
    """podman's time stamps (UTC, nanoseconds: ``2026-01-02T03:04:05.123456789Z``)."""
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (fraction or "0"))


@dataclass
class Roles:
    """The running containers' names, and the ports of the API and Flower."""

    api: str
    scheduler: str
    flower: str
    workers: dict[str, str]
    api_port: int
    flower_port: int


def _start_roles(box: Containers, secret_env: dict[str, str],
                 call_logs: dict[str, Path]) -> Roles:
    """The API, a scheduler, Flower and two workers, as compose.yaml starts them (on
    loopback ports of their own: they share the host's network)."""
    tuning = {"PROMPTBATCH_VISIBILITY_TIMEOUT_S": "30", "PROMPTBATCH_TASK_TIME_LIMIT_S": "20"}
    api_port, flower_port = free_port(), free_port()
    api = box.start("api", "promptbatch", "api", "--host", "127.0.0.1", "--port",
                    str(api_port), "--workers", "2",
                    env={**secret_env, "PROMPTBATCH_ROLE": "api",
                         "PROMPTBATCH_PORT": str(api_port)})
    scheduler = box.start("scheduler", "promptbatch", "scheduler", "--metrics-port",
                          str(free_port()),
                          env={**secret_env, **tuning, "PROMPTBATCH_ROLE": "scheduler"})
    flower = box.start("flower", "promptbatch", "flower", "--address", "127.0.0.1",
                       "--port", str(flower_port),
                       env={**secret_env, "PROMPTBATCH_ROLE": "flower",
                            "PROMPTBATCH_PORT": str(flower_port),
                            "PROMPTBATCH_FLOWER_BASIC_AUTH_FILE": "/run/secrets/flower_auth"})
    workers: dict[str, str] = {}
    for name, folder in call_logs.items():
        folder.mkdir(mode=0o777)
        folder.chmod(0o777)  # the image's user appends to the call log in it
        workers[name] = box.start(
            name, "promptbatch", "worker", "-c", "2", "--name", name, "--metrics-port",
            str(free_port()), mounts={folder: "/calls"},
            env={**secret_env, **tuning, "PROMPTBATCH_ROLE": "worker",
                 "PROMPTBATCH_ECHO_TEST_HOOKS": "1",
                 "PROMPTBATCH_ECHO_CALL_LOG": "/calls/calls.jsonl"})
    return Roles(api, scheduler, flower, workers, api_port, flower_port)


def _wait_until_healthy(box: Containers, roles: Roles, r: redis.Redis) -> None:
    """Every role up, and every container's own HEALTHCHECK reporting healthy."""
    poll(lambda: _answers(f"http://127.0.0.1:{roles.api_port}/readyz") == 200, timeout=120,
         interval=0.25, what="the API")
    poll(lambda: r.hlen(keys.WORKERS) == 2, timeout=120, interval=0.25, what="both workers")
    poll(lambda: r.get(keys.SCHEDULER_LEASE), timeout=60, interval=0.25,
         what="the scheduler's lease")

    def healthy(name: str) -> None:
        poll(lambda: box.healthy(name), timeout=90, interval=1, what=f"{name}'s health check")
        health = box.state(name).get("Health") or box.state(name).get("Healthcheck")
        assert health and health["Status"] == "healthy", (name, health)

    with ThreadPoolExecutor(5) as pool:  # each check starts a Python: all at once
        list(pool.map(healthy, (roles.api, roles.scheduler, roles.flower,
                                *roles.workers.values())))
    # The check can fail: a worker's check where no worker runs says so.
    assert box.podman("exec", roles.scheduler, "promptbatch", "health", "worker"
                      ).returncode == 1
    flower_url = f"http://127.0.0.1:{roles.flower_port}/"
    assert _answers(flower_url) == 401 and _answers(flower_url, ("ops", "image-flower")) == 200


def _sigterm_a_worker_in_a_slow_batch(box: Containers, roles: Roles, store: JobStore,
                                      call_logs: dict[str, Path],
                                      slow: set[str]) -> tuple[str, list[str], float]:
    """SIGTERM the worker container that runs a batch of slow jobs; once it exited 0,
    that batch has finished in it. Returns the worker, its batch and the seconds from
    the signal to the exit."""
    def running_slow() -> tuple[str, list[str]] | None:
        for name, folder in call_logs.items():
            for batch in _batches(folder / "calls.jsonl"):
                if slow & set(batch):
                    return name, batch
        return None

    found = poll(running_slow, timeout=120, interval=0.05, what="a slow batch to start")
    assert found is not None
    leaving, batch = found
    container = roles.workers[leaving]
    assert not all(s.state.final for s in store.get_many(batch).values()), \
        "the batch ended before the signal"
    signalled = time.time()
    killed = box.podman("kill", "--signal", "TERM", container)
    assert killed.returncode == 0, killed.stderr
    poll(lambda: box.state(container)["Status"] == "exited", timeout=180, interval=0.5,
         what=f"{leaving} to exit after its SIGTERM")
    state = box.state(container)
    assert state["ExitCode"] == 0, box.logs(container)[-3000:]
    assert "warm shutdown (SIGTERM)" in box.logs(container)
    ended = store.get_many(batch)  # finished in it, before it exited
    assert {s.state.value for s in ended.values()} == {"SUCCEEDED"}
    exited_at = _unix(state["FinishedAt"])
    assert all(s.result is not None and s.result.finished_at <= exited_at
               for s in ended.values())
    return leaving, batch, exited_at - signalled


@pytest.mark.timeout(1800)
def test_21_the_image_runs_every_role_and_a_worker_container_shuts_down_warm(
        tmp_path: Path) -> None:
    _skip_unless_tools()
    began = time.monotonic()
    image = build_image()
    built = time.monotonic() - began
    pg = PostgresServer().start()
    server = EmbeddedRedis(tmp_path / "redis", password="image-secret").start()
    database_url = create_database(pg.admin_url)
    _write_secrets(tmp_path / "secrets", {
        "redis_url": server.url, "database_url": database_url,
        "api_keys": json.dumps({"key-image": "tenant-image"}), "broker_url": "",
        "flower_auth": "ops:image-flower"})
    secret_env = {f"PROMPTBATCH_{n.upper()}_FILE": f"/run/secrets/{n}"
                  for n in ("redis_url", "database_url", "api_keys", "broker_url")}
    box = Containers(image, tmp_path / "secrets")
    r = redis.Redis.from_url(server.url, decode_responses=True)
    store = JobStore(database_url)
    call_logs = {"worker-1": tmp_path / "calls-1", "worker-2": tmp_path / "calls-2"}
    try:
        migrated = box.once("migrate", "promptbatch", "migrate", env=secret_env)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert "schema empty ->" in migrated.stdout, migrated.stdout
        roles = _start_roles(box, secret_env, call_logs)
        _wait_until_healthy(box, roles, r)
        _assert_lean_and_unprivileged(box, roles.api)

        started = time.monotonic()
        ids = _submit(f"http://127.0.0.1:{roles.api_port}")
        leaving, batch, stopping = _sigterm_a_worker_in_a_slow_batch(
            box, roles, store, call_logs, set(ids[:SLOW]))
        poll(lambda: store.count_by_state() == {"SUCCEEDED": JOBS}, timeout=300, interval=1,
             what="every job to succeed, once, in PostgreSQL")
        ran = time.monotonic() - started
        results = list(r.scan_iter(match=keys.celery_result("*"), count=1000))
        assert len(results) == JOBS
        assert all(r.mget([keys.celery_result(i) for i in ids]))
        calls = _calls({n: f / "calls.jsonl" for n, f in call_logs.items()})
        total = calls["worker-1"] + calls["worker-2"]
        assert set(total) == set(ids) and set(total.values()) == {1}, \
            "a job was not called, or called twice"
        assert all(calls[leaving][j] == 1 for j in batch)
        print(f"\n{JOBS} jobs through the image's containers: worker-1 called "
              f"{len(calls['worker-1'])}, worker-2 {len(calls['worker-2'])}; {leaving} "
              f"finished its batch of {len(batch)} and exited 0 {stopping:.1f} s after the "
              f"SIGTERM; image ready in {built:.1f} s, containers healthy in "
              f"{started - began - built:.1f} s, jobs done in {ran:.1f} s")
    except BaseException:
        print(box.tail())
        raise
    finally:
        box.remove_all()
        store.close()
        r.close()
        server.stop()
        pg.stop()


def _submit(base: str) -> list[str]:
    """JOBS jobs through the API, in five requests; the first SLOW hold their batch 4 s."""
    jobs = [{"prompt": (f"[echo:sleep=4] slow ticket {i}: route it" if i < SLOW
                        else f"ticket {i}: route it to the right team"),
             "priority": CLASSES[i % len(CLASSES)]} for i in range(JOBS)]
    ids: list[str] = []
    with httpx.Client(base_url=base, headers={"Authorization": "Bearer key-image"},
                      timeout=60) as http:
        for start in range(0, JOBS, 100):
            resp = http.post("/v1/jobs", json={"jobs": jobs[start:start + 100]})
            assert resp.status_code == 201, resp.text
            ids += resp.json()["ids"]
    assert len(set(ids)) == JOBS
    return ids


def _assert_lean_and_unprivileged(box: Containers, name: str) -> None:
    """Inside a running container: tini is PID 1, the role runs as uid 10001, and there
    is no compiler, no pip, and no test suite of the project."""
    probe = box.podman("exec", name, "sh", "-c",
                       "tr '\\0' ' ' < /proc/1/cmdline; echo; id -u; "
                       "command -v gcc cc c++ make pip pip3 || true; "
                       "find /opt/promptbatch -type d -name tests; cd " + SITE + " && "
                       "find tests config jobs producers scheduler workers promptbatch "
                       "-name 'test*' 2>/dev/null; true")
    assert probe.returncode == 0, probe.stderr
    init, uid, *rest = probe.stdout.splitlines()
    assert init.startswith("/usr/bin/tini -- promptbatch api"), init
    assert uid == "10001"
    assert rest == [], f"found in the image: {rest}"


def _answers(url: str, auth: tuple[str, str] | None = None) -> int | None:
    try:
        return httpx.get(url, auth=auth, timeout=5).status_code
    except httpx.HTTPError:
        return None

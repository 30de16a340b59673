"""The service path as a newcomer meets it: commands run from different folders and
terminals, without the variables they need, on a store not yet migrated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Settings
from tests.helpers import poll

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def plain_env(home: Path, **extra: str) -> dict[str, str]:
    """A terminal's environment: no PROMPTBATCH_* variables, a home of the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.pop("XDG_DATA_HOME", None)
    env["HOME"] = str(home)
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "promptbatch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("argv", [
    ["-m", "promptbatch", "scheduler"], ["-m", "promptbatch", "worker"],
    ["-m", "promptbatch", "status", "some-id"], ["-m", "promptbatch", "api"],
    ["-m", "celery", "-A", "workers.app", "flower"]])
def test_without_a_redis_url_every_command_says_what_to_set_in_one_line(
        tmp_path: Path, argv: list[str]) -> None:
    done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=plain_env(tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, said
    assert len(said) == 1 and "PROMPTBATCH_REDIS_URL" in said[0], said
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_client_and_workers_started_in_different_folders_share_one_store_or_refuse(
        redis_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    service_dir, user_dir, elsewhere = (tmp_path / d for d in ("service", "user", "other"))
    for d in (home, service_dir, user_dir, elsewhere):
        d.mkdir()
    env = plain_env(home, PROMPTBATCH_REDIS_URL=redis_url)
    assert cli("migrate", cwd=service_dir, env=env).returncode == 0
    logs = [(service_dir / f"{n}.log").open("wb") for n in ("scheduler", "worker")]
    procs = [subprocess.Popen([sys.executable, "-m", "promptbatch", *args], cwd=service_dir,
                              env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
             for args, log in ((["scheduler"], logs[0]),
                               (["worker", "-c", "1", "--loglevel", "warning"], logs[1]))]
    try:
        src = user_dir / "in.jsonl"
        src.write_text(json.dumps({"id": "hello-1", "prompt": "Hello"}) + "\n")
        done = cli("submit", "in.jsonl", "--wait", cwd=user_dir, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == "SUCCEEDED"
        shown = cli("status", "hello-1", cwd=elsewhere, env=env)  # the line's own id
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "SUCCEEDED"
        # A relative SQLite path from another folder is another store: refused, at once.
        other = {**env, "PROMPTBATCH_DATABASE_URL": "sqlite:///var/promptbatch.db"}
        assert cli("migrate", cwd=elsewhere, env=other).returncode == 0
        refused = cli("submit", str(src), "--wait", cwd=elsewhere, env=other, timeout=60)
        assert refused.returncode != 0
        assert "PROMPTBATCH_DATABASE_URL" in refused.stderr and "store" in refused.stderr
        worker_there = cli("worker", cwd=elsewhere, env=other, timeout=60)
        assert worker_there.returncode == 2 and "not the one" in worker_there.stderr
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(30)
        for log in logs:
            log.close()


def test_services_refuse_a_store_whose_schema_is_behind_and_say_to_migrate(
        settings: Settings, tmp_path: Path) -> None:
    env = plain_env(tmp_path, PROMPTBATCH_REDIS_URL=settings.redis_url,
                    PROMPTBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'fresh.db'}")
    for command in (["scheduler"], ["worker"], ["api"]):
        done = cli(*command, cwd=tmp_path, env=env, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "promptbatch migrate" in done.stderr and "Traceback" not in done.stderr
    migrated = cli("migrate", cwd=tmp_path, env=env)
    assert migrated.returncode == 0 and "schema empty ->" in migrated.stdout
    again = cli("migrate", cwd=tmp_path, env=env)
    assert again.returncode == 0 and "-> 000" in again.stdout


@pytest.mark.slow
def test_the_example_file_goes_through_the_api_with_an_admin_key_not_a_tenant_key(
        settings: Settings, tmp_path: Path) -> None:
    from tests.integration.test_api import KEY_A, Api

    api = Api(settings, api_admin_keys={"ops-key": "ops"}, api_max_body_bytes=8 << 20,
              max_pending_per_tenant=10_000).start()
    env = plain_env(tmp_path)
    example = str(tmp_path / "prompts.jsonl")  # a copy: its resume state is written beside it
    shutil.copy(ROOT / "examples" / "prompts.jsonl", example)
    try:
        refused = cli("submit", example, "--url", api.url, "--api-key", KEY_A,
                      cwd=tmp_path, env=env)
        assert refused.returncode == 1
        assert "admin key" in refused.stderr
        assert "run the same command again" not in refused.stderr  # it cannot succeed
        accepted = cli("submit", example, "--url", api.url, "--api-key", "ops-key",
                       "--provider", "simulated", cwd=tmp_path, env=env)
        assert accepted.returncode == 0, accepted.stderr
        ids = accepted.stdout.split()
        first = json.loads((ROOT / "examples" / "prompts.jsonl").read_text().splitlines()[0])
        job = api.a.get(f"/v1/jobs/{ids[0]}", headers={"Authorization": "Bearer ops-key"})
        assert job.json()["tenant"] == first["tenant"]
        assert job.json()["provider"] == first.get("provider", "simulated")
    finally:
        api.stop()


def test_a_service_command_started_with_the_same_store_waits_for_redis(
        tmp_path: Path) -> None:
    """The worker waits for a Redis that is not up yet instead of exiting (as compose
    starts it next to Redis)."""
    from promptbatch.embedded import free_port

    env = plain_env(tmp_path, PROMPTBATCH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                    PROMPTBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}")
    proc = subprocess.Popen([sys.executable, "-m", "promptbatch", "worker"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        poll(lambda: b"waiting for Redis" in proc.stdout.readline(), timeout=60,
             what="the worker to say it waits for Redis", proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_the_api_says_where_it_listens_and_logs_each_request(settings: Settings,
                                                             tmp_path: Path) -> None:
    import httpx

    from promptbatch.embedded import free_port

    port = free_port()
    env = plain_env(tmp_path, PROMPTBATCH_REDIS_URL=settings.redis_url,
                    PROMPTBATCH_DATABASE_URL=settings.database_url)
    out = tmp_path / "api.log"
    with out.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "promptbatch", "api", "--port",
                                 str(port)], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        poll(lambda: f"listening on http://127.0.0.1:{port}" in out.read_text(), timeout=60,
             what="the API to say where it listens", proc=proc)

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).is_success
            except httpx.HTTPError:
                return False

        poll(answers, timeout=60, what="the API to answer", proc=proc)
        poll(lambda: "GET /healthz" in out.read_text(), timeout=30,
             what="an access log line", proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

"""Security checks: no pickle, passwords, Flower auth, no secrets stored, TTLs, tenants."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
import yaml
from pydantic import SecretStr

from config import keys
from config.settings import Settings
from jobs.errors import InvalidJob
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port
from tests.conftest import Procs, settings_env
from tests.helpers import poll, provider_calls

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_pickle_message_pushed_into_a_queue_is_refused_and_never_run(
        settings: Settings, procs: Procs, r: redis.Redis, tmp_path: Path) -> None:
    procs.worker(concurrency=1)
    marker = tmp_path / "pwned"
    body = base64.b64encode(pickle.dumps(((_Exploit(marker),), {}, {}))).decode()
    task_id = str(uuid.uuid4())
    message = {"body": body, "content-encoding": "binary",
               "content-type": "application/x-python-serialize",
               "headers": {"lang": "py", "task": "promptbatch.process_batch", "id": task_id,
                           "root_id": task_id, "parent_id": None, "group": None},
               "properties": {"correlation_id": task_id, "delivery_mode": 2,
                              "delivery_info": {"exchange": "promptbatch",
                                                "routing_key": keys.queue(2)},
                              "priority": 0, "body_encoding": "base64",
                              "delivery_tag": str(uuid.uuid4())}}
    r.lpush(keys.queue(2), json.dumps(message))
    poll(lambda: r.llen(keys.queue(2)) == 0, timeout=30, what="the worker to take the message")
    # It is gone from the queue; the worker is still serving, and nothing ran.
    with Client(settings) as client:
        procs.scheduler()
        job = client.submit("still alive?")
        assert client.result(job, timeout=30).text == "echo: still alive?"
    assert not marker.exists(), "a pickle payload was executed"
    assert r.get(keys.celery_result(task_id)) is None


@pytest.mark.slow
def test_redis_with_a_password_refuses_strangers_and_serves_us(settings: Settings,
                                                               tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "locked", password="s3cret-pass") as server:
        stranger = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.AuthenticationError):
            stranger.ping()
        s = settings.model_copy(update={"redis_url": server.url})
        log_dir = tmp_path / "logs"
        log_dir.mkdir()
        procs = Procs(s, log_dir)
        try:
            procs.scheduler()
            procs.worker(concurrency=1)
            with Client(s) as client:
                job = client.submit("behind a password")
                assert client.result(job, timeout=30).text == "echo: behind a password"
        finally:
            procs.stop_all()
        assert "s3cret-pass" not in (log_dir / "scheduler-0.log").read_text()


@pytest.mark.slow
def test_flower_as_deployed_answers_401_without_credentials(settings: Settings,
                                                            tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service = compose["services"]["flower"]
    command = list(service["command"])
    assert command[:2] == ["promptbatch", "flower"] and "0.0.0.0" in command
    assert "PROMPTBATCH_FLOWER_BASIC_AUTH_FILE" in service["environment"]
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    secret = tmp_path / "flower_auth"  # as Docker mounts the secret
    secret.write_text("ops:correct-horse\n")
    env = settings_env(settings, PROMPTBATCH_FLOWER_BASIC_AUTH_FILE=str(secret))
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"

        def answers() -> int | None:
            try:
                return httpx.get(url, timeout=1).status_code
            except httpx.HTTPError:
                return None

        assert poll(answers, timeout=60, what="Flower to answer", proc=flower) == 401
        assert httpx.get(f"{url}api/workers", timeout=5).status_code == 401
        assert httpx.get(url, auth=("ops", "correct-horse"), timeout=5).status_code == 200
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(15)
        log.close()


def test_the_compose_file_runs_redis_with_aof_and_a_password() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    redis_cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--requirepass" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    env = compose["x-promptbatch"]["environment"]
    assert env["PROMPTBATCH_REDIS_URL_FILE"].startswith("/run/secrets/")  # no password inline
    assert "password" not in json.dumps(compose["x-promptbatch"]).lower()


@pytest.mark.slow
def test_every_result_and_payload_key_expires(settings: Settings, procs: Procs,
                                              r: redis.Redis) -> None:
    procs.scheduler()
    procs.worker(concurrency=1)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i}"} for i in range(50))
        pending = client.submit("left waiting", priority="bulk", timeout_s=3600)
        client.cancel(pending)
        list(client.results(ids, timeout=60))
    checked = 0
    for key in r.scan_iter(count=1000):
        if key.startswith((keys.PREFIX + "job:", keys.CELERY_RESULT_PREFIX,
                           keys.PREFIX + "batch:", keys.PREFIX + "tenant:")):
            assert r.ttl(key) > 0, f"{key} never expires"
            checked += 1
    assert checked >= 2 * 51


def test_api_routes_for_files_and_batches_are_tenant_scoped(settings: Settings,
                                                            tmp_path: Path) -> None:
    from tests.integration.test_api import Api

    api = Api(settings).start()
    try:
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}}
        up = api.a.post("/v1/files", data={"purpose": "batch"},
                        files={"file": ("in.jsonl", json.dumps(line).encode())}).json()
        batch = api.a.post("/v1/batches", json={"input_file_id": up["id"],
                                                "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"}).json()
        for call in (lambda: api.b.get(f"/v1/files/{up['id']}"),
                     lambda: api.b.get(f"/v1/files/{up['id']}/content"),
                     lambda: api.b.get(f"/v1/batches/{batch['id']}"),
                     lambda: api.b.post(f"/v1/batches/{batch['id']}/cancel")):
            assert call().status_code == 404
        assert api.b.get("/v1/batches").json()["data"] == []
        refused = api.b.post("/v1/batches", json={"input_file_id": up["id"],
                                                  "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"})
        assert refused.status_code == 404
        assert api.a.get(f"/v1/batches/{batch['id']}").status_code == 200
    finally:
        api.stop()


@pytest.mark.slow
def test_a_crash_hook_sent_through_the_api_with_default_settings_kills_no_worker(
        settings: Settings, tmp_path: Path) -> None:
    from tests.integration.test_api import Api

    defaults = settings.model_copy(update={"echo_test_hooks": Settings.model_fields[
        "echo_test_hooks"].default})
    assert defaults.echo_test_hooks is False
    log_dir = tmp_path / "default-logs"
    log_dir.mkdir()
    procs = Procs(defaults, log_dir)
    api = Api(defaults).start()
    try:
        procs.scheduler()
        worker = procs.worker(concurrency=2)
        family = {p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
        assert family, "no pool processes"
        ids = [api.a.post("/v1/jobs", json={"prompt": text}).json()["id"]
               for text in ("[echo:crash] goodbye", "hold it [echo:sleep=30]")]
        for job_id in ids:
            res = api.a.get(f"/v1/jobs/{job_id}/result", params={"wait": 20}).json()
            assert res["state"] == "SUCCEEDED", res
            assert res["latency_ms"] < 10_000, "the sleep hook held a worker"
        assert worker.poll() is None
        assert {p.pid for p in psutil.Process(worker.pid).children(recursive=True)} == family, \
            "a pool process died"
        assert provider_calls(defaults.echo_call_log)[ids[0]] == 1
    finally:
        api.stop()
        procs.stop_all()


def test_a_tenant_may_use_only_the_providers_and_models_it_is_given(
        settings: Settings, r: redis.Redis) -> None:
    from tests.integration.test_api import Api, fields

    s = settings.model_copy(update={
        "allowed_models": {"echo": ["echo-1"], "simulated": ["sim-1"]},
        "tenant_providers": {"tenant-a": ["*"], "*": ["echo", "openai|gpt-4o-mini"]},
        "openai_api_key": SecretStr("sk-test")})  # openai can be called: only rights refuse
    api = Api(s).start()
    try:
        for body, field in (({"prompt": "x", "provider": "simulated"}, "provider"),
                            ({"prompt": "x", "provider": "anthropic"}, "provider"),
                            ({"prompt": "x", "provider": "openai", "model": "gpt-4o"}, "model"),
                            ({"jobs": [{"prompt": "ok"}, {"prompt": "x", "provider": "simulated"}]},
                             "jobs.1.provider")):
            resp = api.b.post("/v1/jobs", json=body)
            assert resp.status_code == 422, resp.text
            assert field in fields(resp), resp.text
            assert "tenant_providers" in resp.text
        assert r.xlen(keys.INTAKE) == 0
        assert api.b.post("/v1/jobs", json={"prompt": "x"}).status_code == 201
        assert api.b.post("/v1/jobs", json={"prompt": "x", "provider": "openai",
                                            "model": "gpt-4o-mini"}).status_code == 201
        assert api.a.post("/v1/jobs", json={"prompt": "x", "provider": "simulated"}
                          ).status_code == 201
    finally:
        api.stop()
    with Client(s) as client:  # the Python client checks the same, for a named tenant
        with pytest.raises(InvalidJob) as refused:
            client.submit_many([{"prompt": "x", "provider": "simulated"}], tenant="tenant-b")
        assert refused.value.fields == ["provider"]
        with pytest.raises(InvalidJob):
            client.submit("x", provider="simulated")  # the default tenant is not tenant-a

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
import pytest
import redis
import yaml

from config import keys
from config.settings import Settings
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port
from tests.conftest import Procs, settings_env
from tests.helpers import poll

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
    flower_cmd = compose["services"]["flower"]["command"]
    assert any(part.startswith("--basic_auth=") for part in flower_cmd)
    port = free_port()
    env = settings_env(settings)
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                               f"--port={port}", "--address=127.0.0.1",
                               "--basic_auth=ops:correct-horse"], env=env, stdout=log,
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
    assert env["PROMPTBATCH_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")


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

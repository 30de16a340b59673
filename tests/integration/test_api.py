"""The HTTP API through a real uvicorn server on loopback, real Redis and SQLite."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from config import keys
from config.settings import Settings
from jobs.store import JobStore
from producers.api import create_app
from promptbatch.embedded import EmbeddedRedis, free_port
from tests.conftest import BOTH_STORES, Procs, settings_env
from tests.helpers import poll

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "key-of-tenant-a", "key-of-tenant-b"


class Api:
    """A uvicorn server in a thread, and clients for two tenants."""

    def __init__(self, settings: Settings, **overrides: object) -> None:
        self.settings = settings.model_copy(update={
            "api_keys": {KEY_A: "tenant-a", KEY_B: "tenant-b"},
            "api_max_body_bytes": 64 * 1024, "max_pending_per_tenant": 50, **overrides})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.a = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY_A}"},
                              timeout=30)
        self.b = httpx.Client(base_url=self.url, headers={"X-API-Key": KEY_B}, timeout=30)

    def start(self) -> Api:
        self.thread.start()
        poll(lambda: self.server.started, timeout=30, what="uvicorn to start")
        return self

    def stop(self) -> None:
        self.a.close()
        self.b.close()
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings).start()
    yield server
    server.stop()


def nothing_enqueued(r: redis.Redis, settings: Settings) -> bool:
    store = JobStore(settings.database_url)
    try:
        return r.xlen(keys.INTAKE) == 0 and store.count_by_state() == {}
    finally:
        store.close()


def fields(resp: httpx.Response) -> list[str]:
    return [e["field"] for e in resp.json()["error"].get("errors", [])]


PAST = "2020-01-01T00:00:00Z"


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "  \n "}, 422, "prompt"),
    ({"prompt": "x", "priority": 9}, 422, "priority"),
    ({"prompt": "x", "priority": "2.5"}, 422, "priority"),
    ({"prompt": "x", "priority": True}, 422, "priority"),
    ({"prompt": "x", "deadline": "2030-01-01T00:00:00"}, 422, "deadline"),
    ({"prompt": "x", "deadline": PAST}, 422, "deadline"),
    ({"prompt": "x", "provider": "nope"}, 422, "provider"),
    ({"prompt": "x", "model": "gpt-17"}, 422, "model"),
    ({"prompt": "x", "params": {"temperature": 9}}, 422, "params.temperature"),
    ({"prompt": "x", "params": {"flavour": "mint"}}, 422, "params.flavour"),
    ({"prompt": "x", "tenant": "tenant-b"}, 422, "tenant"),
    ({"jobs": [{"prompt": "fine"}, {"prompt": ""}]}, 422, "jobs.1.prompt"),
    ({"jobs": []}, 422, "jobs"),
    ({"prompt": "x", "lane": "provider_batch"}, 422, "lane"),  # echo has no batch endpoint
    ({"prompt": "x", "lane": "sideways"}, 422, "lane"),
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_enqueued(
        api: Api, r: redis.Redis, body: dict[str, Any], status: int, field: str) -> None:
    resp = api.a.post("/v1/jobs", json=body)
    assert resp.status_code == status, resp.text
    assert field in fields(resp), resp.text
    assert nothing_enqueued(r, api.settings)


@pytest.mark.parametrize(("raw", "status"), [
    (b'{"prompt": "x", "params": {"temperature": NaN}}', 422),
    (b'{"prompt": "x", "metadata": {"score": Infinity}}', 422),
    (b'{"prompt": "caf\xe9"}', 400),
    (b'{"prompt": ', 400),
    (b'{"prompt": "' + b"x" * 70_000 + b'"}', 413),
])
def test_raw_bodies_nan_not_utf8_not_json_too_large(api: Api, r: redis.Redis, raw: bytes,
                                                    status: int) -> None:
    resp = api.a.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    assert "error" in resp.json()
    if status == 422:
        assert fields(resp) and fields(resp)[0].startswith(("params.", "metadata."))
    assert nothing_enqueued(r, api.settings)


def test_missing_or_wrong_key_is_401(api: Api, r: redis.Redis) -> None:
    assert httpx.post(f"{api.url}/v1/jobs", json={"prompt": "x"}).status_code == 401
    resp = httpx.get(f"{api.url}/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert nothing_enqueued(r, api.settings)


@BOTH_STORES
def test_over_the_pending_quota_is_429_and_nothing_more_is_written(api: Api,
                                                                   r: redis.Redis) -> None:
    ok = api.a.post("/v1/jobs", json={"jobs": [{"prompt": f"p{i}"} for i in range(50)]})
    assert ok.status_code == 201
    over = api.a.post("/v1/jobs", json={"prompt": "one more"})
    assert over.status_code == 429 and "tenant-a" in over.json()["error"]["message"]
    assert r.xlen(keys.INTAKE) == 50
    assert api.b.post("/v1/jobs", json={"prompt": "other tenant"}).status_code == 201


@BOTH_STORES
def test_tenants_cannot_see_cancel_or_list_each_others_jobs(api: Api) -> None:
    job_id = api.a.post("/v1/jobs", json={"prompt": "private"}).json()["id"]
    unknown = api.b.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    for resp in (api.b.get(f"/v1/jobs/{job_id}"), api.b.get(f"/v1/jobs/{job_id}/result"),
                 api.b.delete(f"/v1/jobs/{job_id}")):
        assert resp.status_code == 404 == unknown.status_code
        assert resp.json()["error"]["type"] == unknown.json()["error"]["type"]
    assert api.b.get("/v1/jobs").json()["data"] == []
    mine = api.a.get("/v1/jobs").json()["data"]
    assert [j["id"] for j in mine] == [job_id]
    assert api.a.get(f"/v1/jobs/{job_id}").json()["state"] == "QUEUED"
    assert api.a.delete(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED"


@BOTH_STORES
def test_idempotency_key_returns_the_same_job_and_creates_nothing(api: Api,
                                                                  r: redis.Redis) -> None:
    first = api.a.post("/v1/jobs", json={"prompt": "charge card 42"},
                       headers={"Idempotency-Key": "charge-42"}).json()["id"]
    again = api.a.post("/v1/jobs", json={"prompt": "charge card 42"},
                       headers={"Idempotency-Key": "charge-42"}).json()["id"]
    assert first == again and r.xlen(keys.INTAKE) == 1
    other = api.b.post("/v1/jobs", json={"prompt": "charge card 42"},
                       headers={"Idempotency-Key": "charge-42"}).json()["id"]
    assert other != first  # keys are per tenant


@BOTH_STORES
def test_listing_pages_with_a_cursor_and_filters_by_state(api: Api) -> None:
    ids = api.a.post("/v1/jobs", json={"jobs": [{"prompt": f"p{i}"} for i in range(5)]}
                     ).json()["ids"]
    api.a.delete(f"/v1/jobs/{ids[0]}")
    page1 = api.a.get("/v1/jobs", params={"limit": 3}).json()
    page2 = api.a.get("/v1/jobs", params={"limit": 3, "cursor": page1["next_cursor"]}).json()
    assert [j["id"] for j in page1["data"] + page2["data"]] == ids
    cancelled = api.a.get("/v1/jobs", params={"state": "CANCELLED"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    bad = api.a.get("/v1/jobs", params={"cursor": "garbage!"})
    assert bad.status_code == 422 and fields(bad) == ["cursor"]


def test_health_readiness_and_openapi(api: Api) -> None:
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{api.url}/readyz").status_code == 200
    spec = httpx.get(f"{api.url}/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/batches" in spec["paths"]


@pytest.mark.slow
@BOTH_STORES
def test_long_poll_returns_as_soon_as_the_job_ends(api: Api, procs: Procs) -> None:
    pending = api.a.post("/v1/jobs", json={"prompt": "nobody serves me yet"}).json()["id"]
    t0 = time.monotonic()
    resp = api.a.get(f"/v1/jobs/{pending}/result", params={"wait": 0.5})
    assert resp.status_code == 202 and 0.5 <= time.monotonic() - t0 < 2.0
    procs.scheduler()
    procs.worker(concurrency=1)
    job_id = api.a.post("/v1/jobs", json={"prompt": "Quick question"}).json()["id"]
    t0 = time.monotonic()
    resp = api.a.get(f"/v1/jobs/{job_id}/result", params={"wait": 30})
    assert resp.status_code == 200 and resp.json()["state"] == "SUCCEEDED"
    assert time.monotonic() - t0 < 10, "the long poll did not return when the job ended"


@pytest.mark.slow
@BOTH_STORES
def test_openai_sdk_runs_a_batch_end_to_end(api: Api, procs: Procs, tmp_path: Path) -> None:
    from openai import OpenAI

    procs.scheduler()
    procs.worker(concurrency=2)
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "echo-1", "max_tokens": 50,
                       "messages": [{"role": "user", "content": f"Translate item {i}"}]}}
             for i in range(12)]
    lines.insert(4, {"custom_id": "bad-line", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "echo-1", "messages": []}})
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    client = OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
    uploaded = client.files.create(file=src.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    # Small and quick: it may be done by the time the create answers.
    assert batch.status in ("validating", "in_progress", "finalizing", "completed")
    done = poll(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b,
                timeout=60, interval=0.2, what="the batch to complete")
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (13, 12, 1)
    assert done.output_file_id and done.error_file_id
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(12)]
    body = out[3]["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "echo: user: Translate item 3"
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad-line"]
    message = errors[0]["error"]["message"]
    assert "messages" in message
    assert message.count("line 5") == 1, f"the line is named more than once: {message}"
    assert [b.id for b in client.batches.list()] == [batch.id]
    other = OpenAI(base_url=f"{api.url}/v1", api_key=KEY_B, max_retries=0)
    with pytest.raises(Exception, match="404"):
        other.batches.retrieve(batch.id)


@pytest.mark.slow
def test_submit_cli_resumes_after_being_killed(api: Api, procs: Procs, r: redis.Redis,
                                               tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"l{i}", "prompt": f"Line {i}"}) + "\n"
                           for i in range(40)))
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "promptbatch", "submit", str(src), "--url", api.url,
            "--out", str(out), "--chunk", "10"]
    env = {**settings_env(api.settings), "PROMPTBATCH_API_KEY": KEY_A}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    ledger = Path(f"{out}.promptbatch-state") / "submitted.tsv"
    poll(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 10,
         timeout=60, what="the first chunk to be acknowledged", proc=first)
    os.killpg(first.pid, signal.SIGKILL)  # no workers yet: it cannot have finished
    first.wait()
    assert not out.exists()
    procs.scheduler()
    procs.worker(concurrency=1)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"l{i}" for i in range(40)]
    assert {row["state"] for row in rows} == {"SUCCEEDED"}
    store = JobStore(api.settings.database_url)
    assert sum(store.count_by_state().values()) == 40, "a line was submitted twice"
    store.close()


def test_redis_down_answers_503_within_two_seconds(settings: Settings, tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "own-redis").start()
    s = settings.model_copy(update={"redis_url": server.url})
    api = Api(s).start()
    try:
        assert api.a.post("/v1/jobs", json={"prompt": "before"}).status_code == 201
        server.kill()
        for call in (lambda: api.a.post("/v1/jobs", json={"prompt": "during"}),
                     lambda: httpx.get(f"{api.url}/readyz", timeout=10)):
            t0 = time.monotonic()
            resp = call()
            assert resp.status_code == 503, resp.text
            assert time.monotonic() - t0 < 2.0
        store = JobStore(s.database_url)
        assert store.count_by_state() == {"QUEUED": 1}, "the refused job was half written"
        store.close()
    finally:
        api.stop()
        server.stop()


@pytest.mark.parametrize(("quota", "bad_at", "status", "field"), [
    (10_000, 2_400, 422, "jobs.2399.prompt"),  # one bad job near the end
    (2_000, None, 429, None),  # the quota runs out at 2,000
    (10_000, None, 201, None),  # all fine: every id comes back
])
@BOTH_STORES
def test_a_large_post_accepts_every_job_or_none(settings: Settings, r: redis.Redis,
                                                quota: int, bad_at: int | None, status: int,
                                                field: str | None) -> None:
    api = Api(settings, api_max_body_bytes=4 * 1024 * 1024, max_pending_per_tenant=quota)
    api.start()
    try:
        jobs: list[dict[str, Any]] = [{"prompt": f"job {i}"} for i in range(2_500)]
        if bad_at is not None:
            jobs[bad_at - 1] = {"prompt": ""}
        resp = api.a.post("/v1/jobs", json={"jobs": jobs})
        assert resp.status_code == status, resp.text[:500]
        if status != 201:
            if field:
                assert field in fields(resp)
            assert nothing_enqueued(r, api.settings)
            assert r.scard(keys.tenant_pending("tenant-a")) == 0
            return
        ids = resp.json()["ids"]
        assert len(ids) == len(set(ids)) == 2_500
        store = JobStore(api.settings.database_url)
        assert store.count_by_state() == {"QUEUED": 2_500}
        store.close()
        assert r.xlen(keys.INTAKE) == 2_500
    finally:
        api.stop()


def test_docs_render_from_the_package_and_the_openapi_document_matches_the_api(
        api: Api) -> None:
    from openapi_spec_validator import validate

    page = httpx.get(f"{api.url}/docs", timeout=10).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
    for asset in assets:
        served = httpx.get(f"{api.url}{asset}", timeout=10)
        assert served.status_code == 200 and len(served.content) > 500, asset
    doc = httpx.get(f"{api.url}/openapi.json", timeout=10).json()
    validate(doc)
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    refs = {s["$ref"] for s in body["schema"]["oneOf"]}
    assert refs == {"#/components/schemas/JobRequest", "#/components/schemas/JobsRequest"}
    assert "prompt" in doc["components"]["schemas"]["JobRequest"]["properties"]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/jobs/{job_id}"]["get"]["security"]
    text = json.dumps(doc)
    # FastAPI's own error shape ({"detail": [...]}) appears nowhere; ours does.
    assert "HTTPValidationError" not in text
    assert "ValidationError" not in doc["components"]["schemas"]
    err = doc["paths"]["/v1/jobs"]["post"]["responses"]["422"]
    assert err["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    # A bad query parameter is answered in that shape, naming the field.
    resp = api.a.get("/v1/jobs", params={"limit": 0})
    assert resp.status_code == 422 and fields(resp) == ["limit"]


def test_a_tenant_key_may_name_its_own_tenant_and_an_admin_key_any(settings: Settings,
                                                                    r: redis.Redis) -> None:
    api = Api(settings, api_admin_keys={"admin-key": "ops"}).start()
    admin = httpx.Client(base_url=api.url, headers={"Authorization": "Bearer admin-key"},
                         timeout=30)
    try:
        assert api.a.post("/v1/jobs", json={"prompt": "x", "tenant": "tenant-a"}
                          ).status_code == 201
        refused = api.a.post("/v1/jobs", json={"prompt": "x", "tenant": "tenant-b"})
        assert refused.status_code == 422 and "admin key" in refused.text
        made = admin.post("/v1/jobs", json={"jobs": [{"prompt": "for b", "tenant": "tenant-b"},
                                                     {"prompt": "for ops"}]})
        assert made.status_code == 201, made.text
        for_b, for_ops = made.json()["ids"]
        assert api.b.get(f"/v1/jobs/{for_b}").json()["tenant"] == "tenant-b"
        assert admin.get(f"/v1/jobs/{for_ops}").json()["tenant"] == "ops"
        assert admin.get(f"/v1/jobs/{for_b}").status_code == 200  # an admin reads any
        assert api.a.get(f"/v1/jobs/{for_b}").status_code == 404
        assert [j["id"] for j in admin.get("/v1/jobs", params={"tenant": "tenant-b"}
                                           ).json()["data"]] == [for_b]
        assert api.a.get("/v1/jobs", params={"tenant": "tenant-b"}).status_code == 403
    finally:
        admin.close()
        api.stop()

"""Errors read alike whichever way a request comes: an unserved OpenAI field (``n``,
``audio``) says the same on the chat endpoint, ``/v1/jobs``, a JSONL line and the Python
client, and one job's error names no line. Real API in uvicorn, a real
Redis-compatible server and SQLite file; ``promptbatch run`` as a process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from config.settings import Settings
from jobs.errors import IdempotencyConflict, InvalidJob
from producers.client import Client
from tests.integration.test_api import Api, nothing_enqueued
from tests.integration.test_cli import run_cli

pytestmark = pytest.mark.integration

N = "n: only n=1 is served (send n requests)"
AUDIO = "audio: audio output is not served"


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings).start()
    yield server
    server.stop()


def chat(**body: Any) -> dict[str, Any]:
    return {"model": "echo|echo-1", "messages": [{"role": "user", "content": "hi"}], **body}


@pytest.mark.parametrize(("body", "message"), [
    (chat(n=2), N),
    (chat(audio={"voice": "alloy", "format": "wav"}), AUDIO),
    (chat(n=2, temperature=7), f"{N}"),  # refused before the rest is read
    (chat(temperature=7), "temperature: Input should be less than or equal to 2"),
])
def test_chat_errors_name_the_field_first_like_every_other(api: Api, r: redis.Redis,
                                                          body: dict[str, Any],
                                                          message: str) -> None:
    resp = api.a.post("/v1/chat/completions", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["message"] == message
    assert nothing_enqueued(r, api.settings)


@pytest.mark.parametrize(("body", "message"), [
    ({"prompt": "hi", "n": 2}, "n: only n=1 is served (send n requests)"),
    ({"prompt": "hi", "params": {"n": 2}}, "params.n: only n=1 is served (send n requests)"),
    ({"prompt": "hi", "audio": {"voice": "alloy"}}, "audio: audio output is not served"),
    ({"prompt": "hi", "max_tokens": 5}, "max_tokens: a generation parameter: put it in "
                                        "params ({'params': {'max_tokens': ...}})"),
])
def test_a_job_with_an_unserved_openai_field_gets_the_chat_endpoints_words(
        api: Api, r: redis.Redis, body: dict[str, Any], message: str) -> None:
    resp = api.a.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["errors"] == [dict(zip(("field", "message"),
                                                       message.split(": ", 1), strict=True))]
    assert nothing_enqueued(r, api.settings)


def test_n_1_asks_for_nothing_and_is_accepted(api: Api) -> None:
    resp = api.a.post("/v1/jobs", json={"prompt": "hi", "n": 1, "params": {"n": 1}})
    assert resp.status_code in (200, 201), resp.text


def test_a_jsonl_line_with_n_is_refused_with_the_served_fields_words(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "fine"}) + "\n"
                   + json.dumps({"prompt": "twice please", "n": 2}) + "\n", encoding="utf-8")
    done = run_cli("run", str(src), "--out", str(tmp_path / "out.jsonl"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    assert "line 2" in err and "n: only n=1 is served" in err, err
    assert "Extra inputs" not in err


def test_the_clients_one_job_errors_name_no_line(settings: Settings) -> None:
    with Client(settings) as client:
        client.store.migrate()
        with pytest.raises(InvalidJob) as bad:
            client.submit("hi", n=2)
        assert str(bad.value) == f"invalid job: {N}" and bad.value.line is None
        with pytest.raises(InvalidJob) as blank:
            client.submit("   ")
        assert not str(blank.value).startswith("line")
        client.submit("first", idempotency_key="k1")
        with pytest.raises(IdempotencyConflict) as again:
            client.submit("second", idempotency_key="k1")
        assert not str(again.value).startswith("line") and again.value.key == "k1"
        with pytest.raises(InvalidJob) as many:  # many jobs: the position is named
            client.submit_many([{"prompt": "ok"}, {"prompt": "x", "n": 3}])
        assert str(many.value).startswith("line 2: ")

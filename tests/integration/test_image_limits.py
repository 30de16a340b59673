"""Inline images and the body limits, with the limits a deployment has by default, through
a real API on loopback, a real Redis-compatible server and a SQLite file: an image over
``max_image_bytes`` is a 422 naming its field on every path (it never meets a bare 413
first), an image at the bound with its text fits a chat request, and a body over its
limit is a 413 that says what to do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from config.settings import Settings
from tests.helpers import poll
from tests.integration.test_api import KEY_A, Api, fields, nothing_enqueued
from tests.integration.test_request_shapes import batch_line, image, stored, user_with

pytestmark = pytest.mark.integration

#: The body limits as a deployment has them when it sets none.
DEFAULTS = {name: Settings.model_fields[name].default
            for name in ("api_max_request_bytes", "api_max_body_bytes")}
#: The default bound on an inline image (``max_image_bytes``): Anthropic's per image.
BOUND = 5 * 1024 * 1024
FIELD = "messages.0.content.1.image_url.url"


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings, **DEFAULTS).start()
    yield server
    server.stop()


def chat(**body: Any) -> dict[str, Any]:
    return {"model": "echo|echo-1", **body}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs"])
def test_an_image_over_the_bound_is_a_422_naming_its_field_with_the_default_limits(
        api: Api, r: redis.Redis, path: str) -> None:
    big = user_with(image(BOUND + 1))
    body = chat(messages=big) if path.endswith("completions") else {"messages": big}
    resp = api.a.post(path, json=body)
    assert resp.status_code == 422, resp.text[:300]
    assert fields(resp) == [FIELD]
    message = resp.json()["error"]["errors"][0]["message"]
    assert "max_image_bytes" in message and "http(s) URL" in message, message
    assert nothing_enqueued(r, api.settings)


def test_an_image_at_the_bound_and_its_text_fit_a_chat_request(api: Api,
                                                                settings: Settings) -> None:
    text = "Describe this photo. " * 2000  # 42 kB of text beside it
    messages = [{"role": "user", "content": [{"type": "text", "text": text},
                                             image(BOUND)]}]
    # Streamed, the call answers at once with the job's id (no worker needed to see it
    # accepted); leaving the stream early does not matter here.
    with api.a.stream("POST", "/v1/chat/completions",
                      json=chat(messages=messages, stream=True)) as resp:
        assert resp.status_code == 200, resp.read()[:300]
        job_id = resp.headers["x-promptbatch-job-id"]
    spec = stored(settings, job_id)
    assert spec.messages is not None and spec.messages[0].images[0].size == BOUND


def test_a_batch_line_with_an_image_over_the_bound_is_a_line_error(api: Api,
                                                                   tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
    src = tmp_path / "images.jsonl"
    src.write_text(batch_line("big", messages=user_with(image(BOUND + 1))) + "\n")
    file = sdk.files.create(file=src.open("rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = poll(lambda: (b := sdk.batches.retrieve(batch.id)).status == "completed" and b,
                timeout=30, interval=0.1, what="the batch to end")
    assert done.error_file_id is not None
    [line] = sdk.files.content(done.error_file_id).text.splitlines()
    assert f"body.{FIELD}: " in json.loads(line)["error"]["message"]


@pytest.mark.parametrize(("path", "setting"), [
    ("/v1/chat/completions", "PROMPTBATCH_API_MAX_REQUEST_BYTES"),
    ("/v1/jobs", "PROMPTBATCH_API_MAX_BODY_BYTES")])
def test_a_body_over_its_limit_is_a_413_that_says_what_to_do(api: Api, r: redis.Redis,
                                                             path: str, setting: str) -> None:
    limit = int(DEFAULTS["api_max_request_bytes" if "chat" in path else "api_max_body_bytes"])
    # Images at the bound, more of them than the limit holds once in base64.
    over = user_with(image(BOUND)) * (1 + limit // BOUND)
    resp = api.a.post(path, json=chat(messages=over) if "chat" in path else {"messages": over})
    assert resp.status_code == 413, resp.text[:300]
    message = resp.json()["error"]["message"]
    assert "http(s) URL" in message and setting in message and str(limit) in message, message
    assert nothing_enqueued(r, api.settings)


def test_the_bound_is_the_setting(settings: Settings, r: redis.Redis) -> None:
    assert Settings.model_fields["max_image_bytes"].default == BOUND
    api = Api(settings, **{**DEFAULTS, "max_image_bytes": 64 * 1024}).start()
    try:
        small = api.a.post("/v1/jobs", json={"messages": user_with(image(64 * 1024))})
        big = api.a.post("/v1/jobs", json={"messages": user_with(image(64 * 1024 + 1))})
    finally:
        api.stop()
    assert small.status_code in (200, 201), small.text[:300]
    assert big.status_code == 422 and fields(big) == [FIELD], big.text[:300]
    assert "0.0625 MiB" in big.text

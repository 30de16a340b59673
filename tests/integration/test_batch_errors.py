"""A Batch API error line keeps the raw answer of a job that ended FAILED for it
(``invalid_output``), in OpenAI's shape for a request that got an HTTP error: a real API
in uvicorn, a scheduler and a worker as processes (``simulated``, every JSON answer cut in
half), a real Redis-compatible server and SQLite file, read with the official SDK."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from config.settings import Settings
from tests.conftest import Procs
from tests.helpers import poll
from tests.integration.test_api import KEY_A, Api

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMA = {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def line(custom_id: str, **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "simulated|sim-1", **body}})


def test_an_error_line_of_an_invalid_answer_keeps_the_raw_answer(
        settings: Settings, procs: Procs, tmp_path: Path) -> None:
    procs.scheduler()
    procs.worker(1, PROMPTBATCH_SIMULATED_INVALID_RATE="1",
                 PROMPTBATCH_SIMULATED_TIME_SCALE="0")
    api = Api(settings).start()
    try:
        sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY_A, max_retries=0)
        src = tmp_path / "in.jsonl"
        src.write_text("\n".join([
            line("json", messages=[{"role": "user", "content": "Ada Lovelace, 1815"}],
                 response_format={"type": "json_schema", "json_schema": SCHEMA}),
            line("tool", messages=[{"role": "user", "content": "Weather in Oslo"}],
                 tools=[TOOL], tool_choice="required"),
            line("bad", messages=[]),
        ]) + "\n")
        file = sdk.files.create(file=src.open("rb"), purpose="batch")
        batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        done = poll(lambda: (b := sdk.batches.retrieve(batch.id)).status == "completed"
                    and b, timeout=60, interval=0.2, what="the batch to end")
        assert done.error_file_id is not None and done.output_file_id is None
        lines = {x["custom_id"]: x for x in map(
            json.loads, sdk.files.content(done.error_file_id).text.splitlines())}
        results = {cid: api.a.get(f"/v1/jobs/{lines[cid]['response']['request_id']}/result"
                                  ).json() for cid in ("json", "tool")}
    finally:
        api.stop()
    for custom_id, res in results.items():
        got = lines[custom_id]
        assert res["state"] == "FAILED" and res["error_code"] == "invalid_output"
        assert got["error"] == {"code": "invalid_output", "message": res["error"]}
        response = got["response"]
        assert response["status_code"] == 502
        body = response["body"]
        assert body["error"]["code"] == "invalid_output"
        assert body["error"]["message"] == res["error"]
        assert body["object"] == "chat.completion"
        message = body["choices"][0]["message"]
        assert body["usage"]["prompt_tokens"] == res["usage"]["prompt_tokens"] > 0
        if custom_id == "json":  # the content as the provider wrote it: JSON cut in half
            assert message["content"] == res["text"] and res["text"]
            with pytest.raises(json.JSONDecodeError):
                json.loads(message["content"])
        else:
            assert message["tool_calls"] == res["tool_calls"] and res["tool_calls"]
            assert body["choices"][0]["finish_reason"] == "tool_calls"
    # A line refused before it ran has no answer to keep.
    assert lines["bad"]["response"] is None and lines["bad"]["error"]["code"]

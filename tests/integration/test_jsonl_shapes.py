"""JSONL lines (``promptbatch run`` / ``submit``) with OpenAI's shapes: a bad schema, tool
name, tool answer or image, or a field the run's provider cannot serve, is reported by
line and field before anything is submitted; good lines run and keep their shapes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from promptbatch.bulk import scan
from promptbatch.jsonl import load_file
from tests.integration.test_cli import run_cli

TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
SCHEMA: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}


#: The run's bound on an inline image (``max_image_bytes``), above Anthropic's 5 MiB.
LIMIT = 8 * 1024 * 1024


def big_image(decoded: int) -> str:
    return "data:image/png;base64," + base64.b64encode(b"\0" * decoded).decode()


#: (line, the field it is refused for, with the anthropic provider only?)
LINES: list[tuple[dict[str, Any], str, bool]] = [
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}}},
     "response_format.json_schema.schema", False),
    ({"prompt": "x", "tools": [{**TOOL, "function": {**TOOL["function"], "name": "a.b"}}]},
     "tools.0.function.name", False),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "tool", "tool_call_id": "nope", "content": "1"}]},
     "messages.1.tool_call_id", False),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big_image(LIMIT + 3)}}]}]},
     "messages.0.content.0.image_url.url", False),
    ({"prompt": "x", "params": {"logprobs": True}}, "params.logprobs", True),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": big_image(6 * 1024 * 1024)}}]}]},
     "messages.0.content.1.image_url.url", True),
]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_lines_are_refused_by_line_and_field_for_their_provider(tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", [{"prompt": "fine", "tools": [TOOL]},
                                        *(line for line, _, _ in LINES)])
    for provider in ("echo", "anthropic"):
        good, bad = load_file(src, provider, LIMIT)
        wanted = {n + 2: field for n, (_, field, only) in enumerate(LINES)
                  if provider == "anthropic" or not only}
        assert {e.line: e.fields for e in bad} == {n: [f] for n, f in wanted.items()}
        assert len(good) == len(LINES) + 1 - len(wanted)
        found = scan(src, provider, LIMIT)
        assert (found.valid, found.invalid) == (len(good), len(bad))
    # A line that names its own provider is checked against it, whatever the run's.
    own = write(tmp_path / "own.jsonl", [{"prompt": "x", "provider": "anthropic",
                                          "params": {"seed": 1}}])
    assert [e.fields for e in load_file(own, "echo")[1]] == [["params.seed"]]


def test_run_refuses_a_file_naming_line_and_field_before_starting_anything(
        tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", [{"prompt": "fine"},
                                        *(line for line, _, _ in LINES[:3]),
                                        {"prompt": "x", "params": {"seed": 1}}])
    done = run_cli("run", str(src), "--provider", "anthropic", "--out",
                   str(tmp_path / "out.jsonl"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    for n, field in ((2, "response_format.json_schema.schema"),
                     (3, "tools.0.function.name"), (4, "messages.1.tool_call_id"),
                     (5, "params.seed")):
        assert f"line {n}" in err and field in err, (n, field, err)
    assert "nothing was submitted" in err
    assert not (tmp_path / "var").exists(), "a stack was started for an invalid file"


@pytest.mark.slow
@pytest.mark.integration
def test_run_takes_lines_with_tools_schemas_and_images(tmp_path: Path) -> None:
    pixel = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\0" * 60).decode()
    rows = [{"id": "tools", "prompt": "Weather in Oslo?", "tools": [TOOL],
             "tool_choice": "auto"},
            {"id": "schema", "prompt": "Name a person", "response_format": SCHEMA},
            {"id": "image", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": pixel, "detail": "low"}}]}]},
            {"id": "answer", "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "4 degrees"}],
             "tools": [TOOL], "params": {"logprobs": True, "top_logprobs": 1}}]
    out = tmp_path / "out.jsonl"
    done = run_cli("run", str(write(tmp_path / "in.jsonl", rows)), "--out", str(out),
                   "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    got = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in got] == ["tools", "schema", "image", "answer"]
    assert all(r["state"] == "SUCCEEDED" for r in got), got

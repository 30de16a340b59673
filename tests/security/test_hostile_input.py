"""Hostile input from an authenticated tenant: every request answers a 4xx in the API's
error shape, never a 500 or a traceback, and nothing is half written (a real uvicorn
server on loopback, real Redis and SQLite)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobRequest
from jobs.queue import RedisQueue
from jobs.store import JobStore
from jobs.validation import resolve
from tests.integration.test_api import KEY_A, Api

pytestmark = pytest.mark.integration

DEEP = b"[" * 1000 + b"]" * 1000
DEEP_IN_A_FIELD = b'{"prompt": "x", "metadata": {"a": ' + DEEP + b"}}"


@pytest.fixture
def api(settings: Settings, caplog: pytest.LogCaptureFixture) -> Iterator[Api]:
    server = Api(settings, api_max_body_bytes=16 * 1024 * 1024,
                 api_max_request_bytes=1024 * 1024).start()
    caplog.set_level(logging.ERROR)
    yield server
    server.stop()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, "a request raised: " + tracebacks[0].getMessage()


def _error_shape(resp: httpx.Response) -> dict[str, object]:
    body = resp.json()
    assert set(body) == {"error"} and "message" in body["error"], resp.text
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions", "/v1/completions",
                                  "/v1/batches"])
@pytest.mark.parametrize("raw", [DEEP, DEEP_IN_A_FIELD, b"[" * 100_000])
def test_deeply_nested_json_is_a_400(api: Api, r: redis.Redis, path: str, raw: bytes) -> None:
    resp = api.a.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "nests deeper" in str(_error_shape(resp)["message"])
    assert r.xlen(keys.INTAKE) == 0


def test_a_batch_line_that_cannot_be_parsed_goes_to_the_error_file(api: Api) -> None:
    lines = [DEEP, b'{"custom_id": "nan", "method": "POST", "url": "/v1/chat/completions", '
             b'"body": {"model": "echo-1", "temperature": NaN, "messages": []}}', b"{oops"]
    upload = api.a.post("/v1/files", data={"purpose": "batch"},
                        files={"file": ("in.jsonl", b"\n".join(lines) + b"\n")})
    assert upload.status_code == 200, upload.text
    batch = api.a.post("/v1/batches", json={"input_file_id": upload.json()["id"],
                                            "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    record = batch.json()
    assert record["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    errors = api.a.get(f"/v1/files/{record['error_file_id']}/content").text.splitlines()
    messages = [json.loads(line)["error"]["message"] for line in errors]
    assert messages[0].startswith("line 1:") and "nests deeper" in messages[0]
    assert messages[1].startswith("line 2:") and "NaN" in messages[1]
    assert messages[2].startswith("line 3:")


@pytest.mark.parametrize(("path", "size"), [("/v1/jobs", 20 * 1024 * 1024),
                                            ("/v1/chat/completions", 20 * 1024 * 1024),
                                            ("/v1/files", 300 * 1024 * 1024)])
def test_an_oversized_body_is_refused_before_it_is_read(api: Api, path: str,
                                                        size: int) -> None:
    # Only the headers are sent: a server that read the body first would wait for it.
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
                      ).encode())
        head = sock.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head


@pytest.mark.parametrize("value", ["a-b", "1-2-3", "x" * 500, "-", "12"])
def test_a_malformed_last_event_id_is_a_400_before_the_stream_starts(api: Api,
                                                                     value: str) -> None:
    job = api.a.post("/v1/jobs", json={"prompt": "hi", "stream": True}).json()["id"]
    resp = api.a.get(f"/v1/jobs/{job}/stream", headers={"Last-Event-ID": value})
    assert resp.status_code == 400, resp.text
    assert _error_shape(resp)["type"] == "invalid_request_error"


def test_cancelling_a_staged_or_withdrawn_job_is_not_an_error(api: Api, settings: Settings,
                                                              r: redis.Redis) -> None:
    store = JobStore(settings.database_url)
    queue = RedisQueue(r)
    staged, withdrawn = (resolve(JobRequest(prompt="stuck"), job_id=f"job-{n}", now=time.time(),
                                 settings=settings, tenant="tenant-a") for n in (1, 2))
    store.insert([staged, withdrawn])
    queue.stage([staged, withdrawn], ttl_s=600, max_pending=0)  # a submit cut short...
    queue.withdraw([withdrawn])  # ...and one of its jobs withdrawn (a 503's ids)
    assert queue.states([staged.id, withdrawn.id]) == ["STAGED", "WITHDRAWN"]
    for job_id in (staged.id, withdrawn.id):
        resp = api.a.delete(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "CANCELLED"
        assert store.get(job_id).state.value == "CANCELLED"  # type: ignore[union-attr]
    store.close()


def test_reusing_an_idempotency_key_with_another_body_is_a_422_naming_it(
        api: Api, r: redis.Redis) -> None:
    first = api.a.post("/v1/jobs", json={"prompt": "charge card 42"},
                       headers={"Idempotency-Key": "charge-42"})
    assert first.status_code == 201
    again = api.a.post("/v1/jobs", json={"prompt": "charge card 42"},
                       headers={"Idempotency-Key": "charge-42"})
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    other = api.a.post("/v1/jobs", json={"prompt": "charge card 43"},
                       headers={"Idempotency-Key": "charge-42"})
    assert other.status_code == 422, other.text
    error = _error_shape(other)
    assert "charge-42" in str(error["message"])
    assert error["errors"] == [{"field": "idempotency_key",  # type: ignore[comparison-overlap]
                                "message": error["errors"][0]["message"]}]  # type: ignore[index]
    # In a list: the job at fault is named, and none of the list is accepted.
    many = api.a.post("/v1/jobs", json={"jobs": [
        {"prompt": "new one"}, {"prompt": "charge card 44", "idempotency_key": "charge-42"}]})
    assert many.status_code == 422
    assert _error_shape(many)["errors"][0]["field"] == "jobs.1.idempotency_key"  # type: ignore[index]
    assert r.xlen(keys.INTAKE) == 1


def test_no_request_of_a_fuzzed_set_answers_500(api: Api) -> None:
    bodies = [b"", b"null", b"[]", b'"x"', b"1e999999", b"9" * 5000, b'{"jobs": 5}',
              b'{"jobs": [[]]}', b'{"prompt": {"a": 1}}', b'{"messages": "x"}',
              b'{"messages": [{"role": "user", "content": ' + DEEP + b"}]}",
              b'{"prompt": "x", "priority": []}', b'{"prompt": "x", "deadline": "yesterday"}',
              b"\xff\xfe", b'{"model": ' + DEEP + b"}",
              # numbers of any size, in every place a body holds one
              b"1" + b"0" * 400, b'{"wait": 1e400, "ids": ["a"]}',
              b'{"ids": ["a"], "wait": ' + b"9" * 5000 + b"}",
              b'{"prompt": "x", "params": {"seed": 1' + b"0" * 400 + b"}}",
              b'{"prompt": "x", "metadata": {"a": -1' + b"0" * 400 + b"}}",
              b'{"prompt": "x", "timeout_s": 1e400}', b'{"prompt": "x", "priority": 1e400}',
              b'{"model": "echo-1", "prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}",
              b'{"model": "echo-1", "messages": [{"role": "user", "content": "x"}], '
              b'"n": 1' + b"0" * 400 + b"}",
              b'{"input_file_id": "f", "endpoint": "/v1/chat/completions", '
              b'"completion_window": "1' + b"0" * 400 + b'h"}']
    for path in ("/v1/jobs", "/v1/chat/completions", "/v1/completions", "/v1/batches",
                 "/v1/jobs/results"):
        for body in bodies:
            resp = api.a.post(path, content=body, headers={"Content-Type": "application/json"})
            assert 400 <= resp.status_code < 500, (path, body[:40], resp.status_code, resp.text)
            _error_shape(resp)


# --- numbers of any size ------------------------------------------------------------------

BIG = "1" + "0" * 400  # 10**400: past a 64-bit integer and a double
HUGE = "9" * 5000  # past the standard library's 4,300 digits
CHAT = '{"model": "echo-1", "messages": [{"role": "user", "content": "x"}]'


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _in(template: str, number: str) -> dict[str, object]:
    """A request body: ``template`` with ``@`` replaced by the number's digits."""
    return {"content": template.replace("@", number)}


NUMBERS: list[tuple[str, str, dict[str, object], str]] = [
    ("GET", "/v1/jobs", {"params": {"cursor": _cursor([10**400, "x"])}}, "cursor"),
    ("GET", "/v1/jobs", {"params": {"cursor": _cursor([1e300, "x"])}}, "cursor"),
    ("GET", "/v1/jobs", {"params": {"cursor": _cursor(["x" * 5000, 10**30])}}, "cursor"),
    ("GET", "/v1/jobs", {"params": {"limit": HUGE}}, "limit"),
    ("GET", "/v1/jobs/any/result", {"params": {"wait": BIG}}, "wait"),
    ("GET", "/v1/jobs/any/result", {"params": {"wait": "nan"}}, "wait"),
    ("POST", "/v1/jobs/results", _in('{"ids": ["a"], "wait": @}', BIG), "wait"),
    ("POST", "/v1/jobs/results", _in('{"ids": ["a"], "wait": @}', "1e400"), "wait"),
    ("POST", "/v1/jobs/results", _in('{"ids": ["a"], "wait": @}', "1e30"), "wait"),
    ("POST", "/v1/jobs", _in('{"prompt": "x", "params": {"seed": @}}', BIG), "params.seed"),
    ("POST", "/v1/jobs", _in('{"prompt": "x", "params": {"seed": @}}', "1e30"), "params.seed"),
    ("POST", "/v1/jobs", _in('{"prompt": "x", "params": {"seed": @}}', HUGE), "params.seed"),
    ("POST", "/v1/jobs", _in('{"prompt": "x", "metadata": {"n": @}}', BIG), "metadata.n"),
    ("POST", "/v1/jobs", _in('{"prompt": "x", "metadata": {"n": @}}', str(2**64 - 1)),
     "metadata.n"),
    ("POST", "/v1/jobs", _in('{"prompt": "x", "timeout_s": @}', "-1e400"), "timeout_s"),
    ("POST", "/v1/jobs", _in('{"jobs": [{"prompt": "x", "priority": @}]}', BIG),
     "jobs.0.priority"),
    ("POST", "/v1/chat/completions", _in(CHAT + ', "max_tokens": @}', BIG), "max_tokens"),
    ("POST", "/v1/chat/completions", _in(CHAT + ', "seed": @}', HUGE), "seed"),
    ("POST", "/v1/chat/completions", {"content": CHAT + "}", "headers": {"X-Timeout-S": BIG}},
     "X-Timeout-S"),
    ("POST", "/v1/chat/completions", {"content": CHAT + "}", "headers": {"X-Timeout-S": "nan"}},
     "X-Timeout-S"),
    ("POST", "/v1/completions", _in('{"model": "echo-1", "prompt": "x", "max_tokens": @}', BIG),
     "max_tokens"),
]


@pytest.mark.parametrize(("method", "path", "request_args", "field"), NUMBERS,
                         ids=[f"{n}-{p}-{f}" for n, (_, p, _, f) in enumerate(NUMBERS)])
def test_a_number_of_any_size_is_a_4xx_naming_its_field(
        api: Api, r: redis.Redis, method: str, path: str, request_args: dict[str, object],
        field: str) -> None:
    args = dict(request_args)
    headers = {"Content-Type": "application/json", **args.pop("headers", {})}  # type: ignore[dict-item]
    resp = api.a.request(method, path, headers=headers, **args)  # type: ignore[arg-type]
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    error = _error_shape(resp)
    assert field in [e["field"] for e in error["errors"]], resp.text  # type: ignore[attr-defined]
    assert not str(error["message"]).startswith("line "), error["message"]
    assert "4300" not in resp.text and len(resp.text) < 1000  # no parser's words, no echo
    assert r.xlen(keys.INTAKE) == 0
    assert api.a.get("/healthz").status_code == 200  # the connection still serves


PAST_64_BITS = str(10**26)  # within a double: the JSON reader gives it as 1e26


@pytest.mark.parametrize(("path", "template", "field"), [
    ("/v1/jobs", '{"prompt": "x", "params": {"max_tokens": @}}', "params.max_tokens"),
    ("/v1/jobs", '{"prompt": "x", "params": {"seed": @}}', "params.seed"),
    ("/v1/jobs", '{"prompt": "x", "params": {"logprobs": true, "top_logprobs": @}}',
     "params.top_logprobs"),
    ("/v1/chat/completions", CHAT + ', "max_completion_tokens": @}', "max_completion_tokens"),
    ("/v1/chat/completions", CHAT + ', "seed": @}', "seed"),
])
def test_a_whole_number_past_64_bits_is_named_in_plain_words(
        api: Api, path: str, template: str, field: str) -> None:
    resp = api.a.post(path, content=template.replace("@", PAST_64_BITS),
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    errors: list[dict[str, str]] = resp.json()["error"]["errors"]
    assert [e["field"] for e in errors] == [field], resp.text
    assert "Unable to parse" not in resp.text and "too large" in errors[0]["message"], resp.text


def test_a_last_event_id_redis_cannot_take_is_a_400(api: Api) -> None:
    job = api.a.post("/v1/jobs", json={"prompt": "hi", "stream": True}).json()["id"]
    resp = api.a.get(f"/v1/jobs/{job}/stream",
                     headers={"Last-Event-ID": "99999999999999999999-0"})  # > 2**64
    assert resp.status_code == 400, resp.text
    assert _error_shape(resp)["errors"] == [{"field": "Last-Event-ID",  # type: ignore[comparison-overlap]
                                             "message": "not an event id"}]


def test_a_batch_line_with_a_number_out_of_range_names_it(api: Api) -> None:
    line = ('{"custom_id": "big", "method": "POST", "url": "/v1/chat/completions", '
            '"body": {"model": "echo-1", "seed": @, "messages": '
            '[{"role": "user", "content": "x"}]}}'.replace("@", BIG))
    upload = api.a.post("/v1/files", data={"purpose": "batch"},
                        files={"file": ("in.jsonl", line.encode() + b"\n")})
    batch = api.a.post("/v1/batches", json={"input_file_id": upload.json()["id"],
                                            "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    assert batch.json()["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
    errors = api.a.get(f"/v1/files/{batch.json()['error_file_id']}/content").text
    message = json.loads(errors.splitlines()[0])["error"]["message"]
    assert message.startswith("line 1:") and "body.seed" in message, message

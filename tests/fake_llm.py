"""A real HTTP server on loopback that speaks the OpenAI and Anthropic APIs, records
every request, and injects the faults a test scripts for a prompt.

A test scripts faults by a marker the prompt contains: ``server.script("poison",
["500", "500", "ok"])`` answers the first two requests whose text contains ``poison``
with HTTP 500 and the third normally. Actions: ``ok``, an HTTP status (``"429"``,
``"500"``...), ``"429:retry-after-ms=300"`` (with a header), ``stall`` (headers, then
silence), ``reset`` (the connection is dropped), ``malformed`` (a 200 whose body is cut
off), ``empty`` (a reply without text), ``nochoices`` (``choices: []``), ``filtered`` (a
content-filter finish without text), ``context`` (a context-length 400), ``invalid`` (a
400 ``invalid_request_error``), ``say:TEXT`` (a normal answer whose content is TEXT: the
answers a model gives, such as JSON that does not validate). A chat request with
``stream: true`` is answered with server-sent events: the answer word by word,
``token_delay_s`` apart, the usage last when ``stream_options.include_usage`` is set,
then ``[DONE]``. Answers in kind (``tool_call``, ``json``, ``refusal``, logprobs when
asked) are ``tests.fake_answers``'s; a Messages request that Anthropic's API would refuse
(``fake_answers.anthropic_problems``) gets its 400.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests import fake_answers


@dataclass
class Seen:
    """One request the server received."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    start: float
    end: float = 0.0
    action: str = "ok"

    @property
    def text(self) -> str:
        return json.dumps(self.body)


@dataclass
class FakeLLM:
    """The server's state: scripts, and what it has seen."""

    props: bool = False
    delay_s: float = 0.0
    token_delay_s: float = 0.05
    #: The streamed answer's words (default: "re: " and the prompt's start).
    stream_words: int = 12
    #: The arguments of a scripted tool call, and the value of a scripted JSON answer.
    tool_input: dict[str, Any] = field(default_factory=lambda: {"location": "Paris"})
    json_answer: Any = field(default_factory=lambda: {"name": "Goethe"})
    seen: list[Seen] = field(default_factory=list)
    scripts: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    #: Noise on ``delay_s``: each request waits ``delay_s`` times a factor drawn from
    #: ``1 +- jitter``, and ``slow_share`` of them ``slow_factor`` times longer still.
    jitter: float = 0.0
    slow_share: float = 0.0
    slow_factor: float = 5.0
    #: Requests (of ``error_model``, or of every model when it is None) answered with a
    #: 500 at this rate, unless a script says otherwise.
    error_rate: float = 0.0
    error_model: str | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(1))

    def delay(self) -> float:
        """This request's wait."""
        with self.lock:
            factor = 1.0 + self.rng.uniform(-self.jitter, self.jitter)
            if self.slow_share and self.rng.random() < self.slow_share:
                factor *= self.slow_factor
        return self.delay_s * factor

    def fails(self, body: dict[str, Any]) -> bool:
        """Whether this request gets an injected 500 (``error_rate``)."""
        if not self.error_rate or self.error_model not in (None, body.get("model")):
            return False
        with self.lock:
            return self.rng.random() < self.error_rate

    def script(self, marker: str, actions: list[str]) -> None:
        self.scripts[marker] = list(actions)

    def next_action(self, text: str, body: dict[str, Any] | None = None) -> str:
        with self.lock:
            for marker, actions in self.scripts.items():
                if marker in text:
                    return actions.pop(0) if len(actions) > 1 else actions[0]
        return "500" if body is not None and self.fails(body) else "ok"

    def requests_for(self, marker: str) -> list[Seen]:
        return [s for s in self.seen if marker in s.text]


def _answer(path: str, body: dict[str, Any]) -> dict[str, Any]:
    if path.endswith("/v1/messages"):
        system = body.get("system")
        cached = isinstance(system, list) and any("cache_control" in b for b in system)
        return {"id": "msg_1", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": "anthropic says hi"}],
                "usage": {"input_tokens": 10, "output_tokens": 3,
                          "cache_read_input_tokens": 100 if cached else 0,
                          "cache_creation_input_tokens": 24 if cached else 0}}
    if path.endswith("/completions") and "prompt" in body:
        prompts = body["prompt"]
        return {"choices": [{"index": i, "text": f"completion {i}"} for i in range(len(prompts))],
                "usage": {"prompt_tokens": 10 * len(prompts), "completion_tokens": len(prompts),
                          "prompt_tokens_details": {"cached_tokens": 5 * len(prompts)}}}
    content = body["messages"][-1]["content"]
    return {"choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": f"re: {str(content)[:40]}"},
                         "finish_reason": "stop",
                         "logprobs": fake_answers.LOGPROBS if body.get("logprobs") else None}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 4,
                      "prompt_tokens_details": {"cached_tokens": 8}}}


def _said(path: str, body: dict[str, Any], text: str) -> dict[str, Any]:
    """A normal answer whose content (or each prompt's text) is ``text``."""
    usage = {"prompt_tokens": 12, "completion_tokens": len(text) // 4 + 1,
             "prompt_tokens_details": {"cached_tokens": 0}}
    if path.endswith("/completions") and "prompt" in body:
        return {"choices": [{"index": i, "text": text, "finish_reason": "stop"}
                            for i in range(len(body["prompt"]))], "usage": usage}
    return {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}], "usage": usage}


#: Fixed replies: a truncated body, an empty answer, a context-length refusal.
_CANNED: dict[str, tuple[int, bytes]] = {
    "malformed": (200, b'{"choices": [{"message": {"content": "cut off'),
    "empty": (200, json.dumps({"choices": [{"message": {"content": ""}}],
                               "content": []}).encode()),
    "nochoices": (200, json.dumps({"choices": [], "usage": {"prompt_tokens": 3}}).encode()),
    "filtered": (200, json.dumps({"choices": [{"index": 0, "finish_reason": "content_filter",
                                               "message": {"content": ""}}]}).encode()),
    "context": (400, json.dumps({"error": {
        "code": "context_length_exceeded",
        "message": "This model's maximum context length is 8192 tokens; prompt is too long",
    }}).encode()),
    "invalid": (400, json.dumps({"error": {
        "type": "invalid_request_error", "code": None,
        "message": "Invalid prompt: the prompt contains an invalid token sequence",
    }}).encode()),
}


def _canned(action: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """The status and body of a fixed reply, or of a ``say:`` answer."""
    if action.startswith("say:"):
        return 200, json.dumps(_said(path, body, action[4:])).encode()
    return _CANNED[action]


def _drop(handler: BaseHTTPRequestHandler, *, stall: bool) -> None:
    """Send headers then fall silent (stall), or drop the connection with a reset."""
    if stall:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.flush()
        time.sleep(3)
    else:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
        handler.connection.close()
    handler.close_connection = True


def _stream(self: BaseHTTPRequestHandler, state: FakeLLM, body: dict[str, Any]) -> None:
    """Answer a streaming chat request with server-sent events."""
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Connection", "close")
    self.end_headers()
    content = str(body["messages"][-1]["content"])
    words = [f"w{i} " for i in range(state.stream_words)]
    words[0] = f"re: {content[:20]} "
    for word in words:
        chunk = {"choices": [{"index": 0, "delta": {"content": word},
                              "finish_reason": None}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()
        time.sleep(state.token_delay_s)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens":
                                          len(words),
                                          "prompt_tokens_details": {"cached_tokens": 8}}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
    self.wfile.write(b"data: [DONE]\n\n")
    self.wfile.flush()
    self.close_connection = True


def _stream_anthropic(self: BaseHTTPRequestHandler, state: FakeLLM,
                      body: dict[str, Any]) -> None:
    """Answer a streaming Messages request with Anthropic's events."""
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Connection", "close")
    self.end_headers()

    def send(event: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"
                         .encode())
        self.wfile.flush()

    send("message_start", {"message": {"usage": {"input_tokens": 10, "output_tokens": 1,
                                                 "cache_read_input_tokens": 100}}})
    send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for i in range(state.stream_words):
        send("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                           "text": f"a{i} "}})
        time.sleep(state.token_delay_s)
    send("content_block_stop", {"index": 0})
    send("message_delta", {"delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": state.stream_words}})
    send("message_stop", {})
    self.close_connection = True


def _sse(handler: Any, events: Any, *, named: bool) -> None:
    """Send server-sent events: (name, data) pairs when ``named`` (Anthropic), else data
    objects followed by ``[DONE]`` (OpenAI)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Connection", "close")
    handler.end_headers()
    for item in events:
        if named:
            event, data = item
            handler.wfile.write(f"event: {event}\ndata: {json.dumps({'type': event, **data})}"
                                "\n\n".encode())
        else:
            handler.wfile.write(f"data: {json.dumps(item)}\n\n".encode())
        handler.wfile.flush()
    if not named:
        handler.wfile.write(b"data: [DONE]\n\n")
    handler.close_connection = True


def _in_kind(handler: Any, state: FakeLLM, body: dict[str, Any], kind: str) -> None:
    """A scripted tool call, JSON answer or refusal, in the API's own shape."""
    args = (kind, body, state.tool_input, state.json_answer)
    anthropic = handler.path.endswith("/v1/messages")
    if body.get("stream"):
        _sse(handler, fake_answers.anthropic_events(*args) if anthropic
             else fake_answers.openai_chunks(*args), named=anthropic)
    else:
        answer = (fake_answers.anthropic_answer(*args) if anthropic
                  else fake_answers.openai_answer(*args))
        handler._send(200, json.dumps(answer).encode())


def _ok(handler: Any, state: FakeLLM, body: dict[str, Any]) -> None:
    """A good answer: streamed when asked, else whole."""
    if body.get("stream") and handler.path.endswith("/v1/messages"):
        _stream_anthropic(handler, state, body)
    elif body.get("stream") and "messages" in body:
        _stream(handler, state, body)
    else:
        handler._send(200, json.dumps(_answer(handler.path, body)).encode())


def _refused(handler: Any, body: dict[str, Any]) -> bool:
    """Answer 400 for a Messages request Anthropic's API would refuse."""
    problems = (fake_answers.anthropic_problems(body)
                if handler.path.endswith("/v1/messages") else [])
    if problems:
        handler._send(400, json.dumps({"type": "error", "error": {
            "type": "invalid_request_error", "message": "; ".join(problems)}}).encode())
    return bool(problems)


def _act(handler: Any, state: FakeLLM, action: str, body: dict[str, Any]) -> None:
    """Answer a request by its scripted action."""
    if _refused(handler, body):
        return
    if action in fake_answers.KINDS:
        _in_kind(handler, state, body, action)
    elif action == "ok":
        _ok(handler, state, body)
    elif action in _CANNED or action.startswith("say:"):
        handler._send(*_canned(action, handler.path, body))
    elif action in ("stall", "reset"):
        _drop(handler, stall=action == "stall")
    else:
        code, _, header = action.partition(":")
        headers = dict([header.split("=", 1)]) if header else {}
        handler._send(int(code), json.dumps({"error": {"message": action}}).encode(), headers)


def _handler(state: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            return None

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None,
                  ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(payload)  # the client may have given up (a time limit)

        def do_GET(self) -> None:
            if self.path == "/props" and state.props:
                self._send(200, json.dumps({"total_slots": 4}).encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            seen = Seen(self.path, body, dict(self.headers), time.monotonic())
            with state.lock:
                state.seen.append(seen)
            action = state.next_action(json.dumps(body), body)
            seen.action = action
            if state.delay_s:
                time.sleep(state.delay())
            self._act(action, body)
            seen.end = time.monotonic()

        def _act(self, action: str, body: dict[str, Any]) -> None:
            _act(self, state, action, body)

    return Handler


class FakeServer:
    """Runs a ``FakeLLM`` on 127.0.0.1 in a thread."""

    def __init__(self, state: FakeLLM | None = None) -> None:
        self.state = state or FakeLLM()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.httpd.daemon_threads = True
        self.state.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self.state

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

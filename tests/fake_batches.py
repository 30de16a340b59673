"""A real HTTP server on loopback that speaks Anthropic's Message Batches API, written
from its reference: create (``POST /v1/messages/batches``), retrieve, list (newest first,
``after_id``/``before_id``/``limit``, ``has_more``/``first_id``/``last_id``), results
(``GET .../results``: JSONL, one line per request, in no particular order, only once the
batch ended), cancel (``POST .../cancel``: ``canceling``, then the requests not yet
processed end ``canceled``), and expiry (the requests not processed within the window end
``expired``).

A batch is processed when it is next retrieved, unless ``hold`` is set (then it stays
``in_progress`` until released, cancelled or expired by the test: ``expire``). Each
request is answered as the Messages API would, by the text of its last user turn: it
contains ``[errored:TYPE]`` (an ``errored`` result of that error type), ``[say:TEXT]``
(a message whose text is TEXT), else ``re: <the text's start>``. Every request the server
receives is recorded (``seen``), and ``created`` counts the batches it created.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ERRORED = re.compile(r"\[errored:([a-z_]+)\]")
_SAY = re.compile(r"\[say:(.*?)\]", re.S)


def _now_iso(at: float | None = None) -> str:
    when = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return when.isoformat().replace("+00:00", "Z")


@dataclass
class Batch:
    """One message batch and its requests' results (by custom id)."""

    id: str
    requests: list[dict[str, Any]]
    created_at: float
    status: str = "in_progress"
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancel_initiated_at: float | None = None
    ended_at: float | None = None

    def counts(self) -> dict[str, int]:
        out = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for r in self.requests:
            result = self.results.get(r["custom_id"])
            out["processing" if result is None else result["type"]] += 1
        return out


def _text(params: dict[str, Any]) -> str:
    turn = params["messages"][-1]
    content = turn["content"]
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict))


def answer(custom_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """The result of one request, as the Messages API would give it."""
    text = _text(params)
    errored = _ERRORED.search(text)
    if errored:
        return {"type": "errored", "error": {"type": "error", "error": {
            "type": errored.group(1), "message": f"scripted {errored.group(1)}"}}}
    said = _SAY.search(text)
    system = params.get("system")
    cached = isinstance(system, list) and any("cache_control" in b for b in system)
    return {"type": "succeeded", "message": {
        "id": f"msg_{custom_id}", "type": "message", "role": "assistant",
        "model": params["model"], "stop_reason": "end_turn", "stop_sequence": None,
        "content": [{"type": "text", "text": said.group(1) if said else f"re: {text[:40]}"}],
        "usage": {"input_tokens": 10, "output_tokens": 4,
                  "cache_read_input_tokens": 100 if cached else 0,
                  "cache_creation_input_tokens": 0}}}


@dataclass
class FakeBatches:
    """The server's state."""

    url: str = ""
    hold: bool = False
    batches: dict[str, Batch] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def created(self) -> int:
        return len(self.batches)

    def calls(self, method: str, prefix: str) -> int:
        """Requests seen of ``method`` whose path starts with ``prefix``."""
        return sum(1 for m, p in self.seen if m == method and p.startswith(prefix))

    def create(self, body: Any) -> tuple[int, dict[str, Any]]:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not 1 <= len(requests) <= 100_000:
            return 400, _error("invalid_request_error", "requests: 1 to 100,000 items")
        ids = [r.get("custom_id") for r in requests]
        if any(not isinstance(i, str) or not CUSTOM_ID.match(i) for i in ids):
            return 400, _error("invalid_request_error", "custom_id must match "
                               "^[a-zA-Z0-9_-]{1,64}$")
        if len(set(ids)) != len(ids):
            return 400, _error("invalid_request_error", "custom_id must be unique")
        for r in requests:
            p = r.get("params")
            if not isinstance(p, dict) or not all(k in p for k in ("model", "max_tokens",
                                                                     "messages")):
                return 400, _error("invalid_request_error",
                                   "params needs model, max_tokens and messages")
        with self.lock:
            # Ids sort by creation: the list is newest first.
            batch_id = f"msgbatch_{next(self._seq):06d}{uuid.uuid4().hex[:8]}"
            self.batches[batch_id] = Batch(batch_id, requests, time.time())
        return 200, self.view(self.batches[batch_id])

    def process(self, batch: Batch) -> None:
        """Answer every request not answered yet, and end the batch."""
        if batch.status == "ended":
            return
        for r in batch.requests:
            batch.results.setdefault(r["custom_id"], answer(r["custom_id"], r["params"]))
        batch.status, batch.ended_at = "ended", time.time()

    def expire(self, batch_id: str) -> None:
        """The window passed: what was not processed ends ``expired``."""
        with self.lock:
            batch = self.batches[batch_id]
            for r in batch.requests:
                batch.results.setdefault(r["custom_id"], {"type": "expired"})
            batch.status, batch.ended_at = "ended", time.time()

    def cancel(self, batch_id: str) -> dict[str, Any]:
        with self.lock:
            batch = self.batches[batch_id]
            if batch.status == "in_progress":
                batch.status, batch.cancel_initiated_at = "canceling", time.time()
            return self.view(batch)

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        with self.lock:
            batch = self.batches[batch_id]
            if batch.status == "canceling":
                for r in batch.requests:
                    batch.results.setdefault(r["custom_id"], {"type": "canceled"})
                batch.status, batch.ended_at = "ended", time.time()
            elif batch.status == "in_progress" and not self.hold:
                self.process(batch)
            return self.view(batch)

    def view(self, batch: Batch) -> dict[str, Any]:
        return {"id": batch.id, "type": "message_batch", "processing_status": batch.status,
                "request_counts": batch.counts(), "created_at": _now_iso(batch.created_at),
                "expires_at": _now_iso(batch.created_at + 86400),
                "ended_at": _now_iso(batch.ended_at) if batch.ended_at else None,
                "cancel_initiated_at": (_now_iso(batch.cancel_initiated_at)
                                        if batch.cancel_initiated_at else None),
                "archived_at": None,
                "results_url": (f"{self.url}/v1/messages/batches/{batch.id}/results"
                                if batch.status == "ended" else None)}

    def listing(self, query: dict[str, list[str]]) -> dict[str, Any]:
        limit = int((query.get("limit") or ["20"])[0])
        with self.lock:
            ordered = sorted(self.batches.values(), key=lambda b: b.id, reverse=True)
            after = (query.get("after_id") or [None])[0]
            if after is not None:
                ordered = [b for b in ordered if b.id < after]
            page = ordered[:limit]
            data = [self.view(b) for b in page]
        return {"data": data, "has_more": len(ordered) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class _Handler(BaseHTTPRequestHandler):
    state: FakeBatches
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: Any) -> None:
        return

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def _authorised(self) -> bool:
        if not self.headers.get("x-api-key"):
            self._json(401, _error("authentication_error", "x-api-key header is required"))
            return False
        if not self.headers.get("anthropic-version"):
            self._json(400, _error("invalid_request_error",
                                   "anthropic-version header is required"))
            return False
        return True

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        self.state.seen.append(("POST", path))
        if not self._authorised():
            return
        if path == "/v1/messages/batches":
            try:
                body = json.loads(raw)
            except ValueError:
                self._json(400, _error("invalid_request_error", "the body is not JSON"))
                return
            self._json(*self.state.create(body))
            return
        match = re.fullmatch(r"/v1/messages/batches/([\w-]+)/cancel", path)
        if match and match.group(1) in self.state.batches:
            self._json(200, self.state.cancel(match.group(1)))
            return
        self._json(404, _error("not_found_error", f"no {path}"))

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        self.state.seen.append(("GET", path))
        if not self._authorised():
            return
        if path == "/v1/messages/batches":
            self._json(200, self.state.listing(parse_qs(parts.query)))
            return
        match = re.fullmatch(r"/v1/messages/batches/([\w-]+)(/results)?", path)
        if not match or match.group(1) not in self.state.batches:
            self._json(404, _error("not_found_error", f"no {path}"))
            return
        if not match.group(2):
            self._json(200, self.state.retrieve(match.group(1)))
            return
        batch = self.state.batches[match.group(1)]
        if batch.status != "ended":
            self._json(400, _error("invalid_request_error", "the batch has not ended"))
            return
        lines = [json.dumps({"custom_id": cid, "result": res})
                 for cid, res in reversed(list(batch.results.items()))]  # not request order
        self._send(200, ("\n".join(lines) + "\n").encode(), "application/x-jsonl")


class FakeBatchesServer:
    """``with FakeBatchesServer() as state:`` a server on a free loopback port."""

    def __enter__(self) -> FakeBatches:
        self.state = FakeBatches()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.state.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.state

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        with contextlib.suppress(OSError):
            self.server.server_close()

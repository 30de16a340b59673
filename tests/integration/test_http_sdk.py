"""The HTTP SDK (``promptbatch.http``), sync and asyncio, against a real API on loopback
with a scheduler and a worker: every operation; a chunked submit made again with the same
key accepted once; 503s retried honouring Retry-After, with a bound; a stream whose
connection is cut mid-way resumed without losing or repeating a chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from config.settings import Settings
from jobs.models import JobState
from jobs.store import JobStore
from promptbatch.http import ApiError, AsyncClient, Client, ResultTimeout
from tests.conftest import Procs
from tests.integration.test_api import KEY_A, Api

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def api(settings: Settings, procs: Procs) -> Iterator[Api]:
    server = Api(settings, max_pending_per_tenant=10_000, echo_test_hooks=True).start()
    procs.scheduler()
    procs.worker(2)
    yield server
    server.stop()


def test_every_operation_of_the_sync_client(api: Api, settings: Settings) -> None:
    with Client(api.url, KEY_A) as pb:
        one = pb.submit("Hello there", priority="high", metadata={"n": 1})
        assert pb.result(one, timeout=30).text == "echo: Hello there"
        assert pb.get(one).state == "SUCCEEDED" and pb.get(one).metadata == {"n": 1}
        items = [{"prompt": f"item {i}"} for i in range(20)]
        ids = pb.submit_many(items, idempotency_key="nightly-run", chunk=7)
        again = pb.submit_many(items, idempotency_key="nightly-run", chunk=7)  # a re-run
        assert again == ids and len(set(ids)) == 20
        got = {r.id: r.text for r in pb.results(ids, timeout=60)}
        assert got == {i: f"echo: item {n}" for n, i in enumerate(ids)}
        listed = [j.id for j in pb.list(page_size=6)]  # four pages
        assert listed == [one, *ids]
        with pytest.raises(ApiError) as refused:
            pb.submit("x", priority="urgent")
        assert refused.value.status == 422 and refused.value.errors[0]["field"] == "priority"
    store = JobStore(settings.database_url)
    assert sum(store.count_by_state().values()) == 21  # the re-run created nothing
    store.close()


def test_the_async_client_and_cancel(settings: Settings) -> None:
    api = Api(settings, max_pending_per_tenant=10_000).start()  # no worker: jobs wait

    async def main() -> None:
        async with AsyncClient(api.url, KEY_A) as pb:
            ids = await pb.submit_many([{"prompt": f"wait {i}"} for i in range(3)], chunk=2)
            assert [j.id async for j in pb.list(page_size=2)] == ids
            assert await pb.cancel(ids[0]) == JobState.CANCELLED.value
            assert (await pb.get(ids[0])).state == "CANCELLED"
            assert (await pb.result(ids[0], timeout=5)).state is JobState.CANCELLED
            with pytest.raises(ResultTimeout):
                await pb.result(ids[1], timeout=0.5)
            with pytest.raises(ResultTimeout):
                async for _ in pb.results(ids[1:], timeout=0.5):
                    pass

    try:
        asyncio.run(main())
    finally:
        api.stop()


def test_the_async_client_runs_jobs(api: Api) -> None:
    async def main() -> dict[str, str | None]:
        async with AsyncClient(api.url, KEY_A) as pb:
            ids = await pb.submit_many([{"prompt": f"async {i}"} for i in range(5)])
            one = await pb.submit("single")
            assert (await pb.result(one, timeout=30)).text == "echo: single"
            return {r.id: r.text async for r in pb.results(ids, timeout=60)}

    got = asyncio.run(main())
    assert sorted(t or "" for t in got.values()) == [f"echo: async {i}" for i in range(5)]


class Scripted(BaseHTTPRequestHandler):
    """Answers ``POST /v1/jobs`` with the statuses in ``script``, then 201."""

    script: ClassVar[list[int]] = []
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def log_message(self, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Scripted.seen.append((self.path, self.headers.get("idempotency-key")))
        status = Scripted.script.pop(0) if Scripted.script else 201
        body = (json.dumps({"id": "job-1", "object": "job", "state": "QUEUED"}) if status == 201
                else json.dumps({"error": {"type": "service_unavailable", "message": "busy"}}))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status in (429, 503):
            self.send_header("Retry-After", "0.05")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


def test_503_and_429_are_retried_with_the_same_key_and_a_bound() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        Scripted.script, Scripted.seen = [503, 429, 503], []
        with Client(url, "k", max_retries=5) as pb:
            assert pb.submit("hi") == "job-1"
        assert len(Scripted.seen) == 4 and len({k for _, k in Scripted.seen}) == 1
        Scripted.script, Scripted.seen = [503] * 10, []
        with Client(url, "k", max_retries=2) as pb, pytest.raises(ApiError) as failed:
            pb.submit("hi")
        assert failed.value.status == 503 and failed.value.type == "service_unavailable"
        assert len(Scripted.seen) == 3  # the first try and two more
    finally:
        httpd.shutdown()


class CuttingProxy:
    """A TCP proxy on loopback to ``target`` that cuts the first stream connection after
    ``cut_after`` bytes of its response: a real dropped connection."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cuts = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        first = client.recv(65536)
        cut = b"/stream" in first.split(b"\r\n", 1)[0] and self.cuts == 0
        if cut:
            self.cuts += 1
        upstream.sendall(first)
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(4096):
                if cut and sent + len(data) > self.cut_after:
                    client.sendall(data[:max(0, self.cut_after - sent)])
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:  # shutdown first: a close alone leaves the pump's recv holding it open
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_stream_cut_mid_way_resumes_without_losing_or_repeating_a_chunk(
        api: Api, flavour: str) -> None:
    proxy = CuttingProxy(("127.0.0.1", api.port), cut_after=700)
    try:
        words = " ".join(f"w{i}" for i in range(40))
        with Client(api.url, KEY_A) as direct:
            job = direct.submit(f"[echo:chunk_ms=20] {words}", stream=True)
        if flavour == "sync":
            with Client(proxy.url, KEY_A) as pb:
                events = list(pb.stream(job))
        else:
            async def read() -> list[Any]:
                async with AsyncClient(proxy.url, KEY_A) as pb:
                    return [e async for e in pb.stream(job)]

            events = asyncio.run(read())
        assert proxy.cuts == 1, "the proxy never cut the stream: the test saw no drop"
        assert events[-1].kind == "end" and events[-1].text == "SUCCEEDED"
        ids = [e.id for e in events]
        assert len(ids) == len(set(ids)), "a chunk came twice"
        text = "".join(e.text for e in events if e.kind == "chunk")
        with Client(api.url, KEY_A) as direct:
            assert text == direct.result(job, timeout=30).text
    finally:
        proxy.close()


def test_submit_many_is_repeatable_whatever_the_chunk_size(settings: Settings) -> None:
    api = Api(settings, max_pending_per_tenant=10_000).start()  # no worker: jobs wait
    items = [{"prompt": f"nightly {i}"} for i in range(14)]
    try:
        with Client(api.url, KEY_A) as pb:
            ids = pb.submit_many(items, idempotency_key="nightly", chunk=7)
            assert pb.submit_many(items, idempotency_key="nightly") == ids  # default chunk
            assert pb.submit_many(items, idempotency_key="nightly", chunk=5) == ids

        async def again() -> list[str]:
            async with AsyncClient(api.url, KEY_A) as pb:
                return await pb.submit_many(items, idempotency_key="nightly", chunk=3)

        assert asyncio.run(again()) == ids
        # The same call as this SDK sent it before (one chunk under "nightly:0", the API
        # keying each job ":{i}"): the jobs stored by the new scheme, not new ones.
        old = api.a.post("/v1/jobs", json={"jobs": items},
                         headers={"Idempotency-Key": "nightly:0"})
        assert old.status_code == 201 and old.json()["ids"] == ids, old.text
        assert len(set(ids)) == 14
    finally:
        api.stop()
    store = JobStore(settings.database_url)
    assert sum(store.count_by_state().values()) == 14
    store.close()


class Dropping(BaseHTTPRequestHandler):
    """Serves a job's stream of ``chunks`` chunk events and an end, one event per
    connection, each connection cut after its event (``drop``: mid-body; else closed
    cleanly); with ``chunks`` 0 and no end (``silent``), no event at all."""

    chunks: ClassVar[int] = 8
    silent: ClassVar[bool] = False
    connections: ClassVar[list[str | None]] = []

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        after = self.headers.get("last-event-id")
        Dropping.connections.append(after)
        n = int(after.split("-")[0]) if after else 0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if Dropping.silent:  # a clean close without an event
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        kind, data = (("chunk", {"text": f"w{n + 1} "}) if n < Dropping.chunks
                      else ("end", {"state": "SUCCEEDED"}))
        event = f"id: {n + 1}-0\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()
        self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        self.wfile.flush()
        self.close_connection = True  # no last chunk: the body is cut mid-way


@pytest.fixture
def dropping() -> Iterator[str]:
    Dropping.chunks, Dropping.silent, Dropping.connections = 8, False, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Dropping)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _read_stream(url: str, flavour: str, max_retries: int) -> list[Any]:
    if flavour == "sync":
        with Client(url, "k", max_retries=max_retries) as pb:
            return list(pb.stream("job-1"))

    async def read() -> list[Any]:
        async with AsyncClient(url, "k", max_retries=max_retries) as pb:
            return [e async for e in pb.stream("job-1")]

    return asyncio.run(read())


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_stream_that_drops_after_every_event_still_reaches_its_end(
        dropping: str, flavour: str) -> None:
    events = _read_stream(dropping, flavour, max_retries=2)  # 8 drops, each after progress
    assert [e.kind for e in events] == ["chunk"] * 8 + ["end"]
    assert "".join(e.text for e in events[:-1]) == "".join(f"w{i} " for i in range(1, 9))
    assert Dropping.connections == [None] + [f"{i}-0" for i in range(1, 9)]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_stream_that_closes_without_an_event_gives_up_after_max_retries(
        dropping: str, flavour: str) -> None:
    Dropping.silent = True
    outcome: list[BaseException | list[Any]] = []

    def run() -> None:
        try:
            outcome.append(_read_stream(dropping, flavour, max_retries=2))
        except BaseException as exc:  # the outcome under test
            outcome.append(exc)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(30)
    assert outcome, f"still retrying after {len(Dropping.connections)} connections"
    assert isinstance(outcome[0], ApiError), outcome[0]
    assert "closed before its end 3 times in a row" in str(outcome[0])
    assert len(Dropping.connections) == 3  # the first try and two more


def test_a_chunk_over_the_apis_body_limit_is_sent_in_parts(settings: Settings) -> None:
    """Jobs that fit the API's body limit one by one but not together (say, with images)
    are accepted, in order and once, whatever the chunk size; a job over the limit alone
    is refused with the API's 413."""
    api = Api(settings, max_pending_per_tenant=10_000).start()  # 64 KiB bodies; no worker
    big = "x" * 12_000  # five of them fit a body, not ten
    items = [{"prompt": f"{i} {big}"} for i in range(10)]
    try:
        with Client(api.url, KEY_A) as pb:
            ids = pb.submit_many(items, idempotency_key="photos")
            assert pb.submit_many(items, idempotency_key="photos", chunk=3) == ids
            with pytest.raises(ApiError) as refused:
                pb.submit_many([{"prompt": "y" * 70_000}])
            assert refused.value.status == 413

        async def main() -> list[str]:
            async with AsyncClient(api.url, KEY_A) as pb:
                return await pb.submit_many(items, idempotency_key="photos")

        assert asyncio.run(main()) == ids
        texts = [api.a.get(f"/v1/jobs/{i}").json()["idempotency_key"] for i in ids]
        assert texts == [f"photos:0:{n}" for n in range(10)]  # in input order
    finally:
        api.stop()
    store = JobStore(settings.database_url)
    assert sum(store.count_by_state().values()) == 10  # each job stored once
    store.close()

"""Streaming through promptbatch against calling the same streaming server directly.

    .venv/bin/python bench/stream.py [--calls 40]

A streaming fake OpenAI server on loopback (``tests/fake_llm.py``: 20 words, 20 ms
apart) answers every call. Rows: the server called directly with ``stream: true``
(httpx, as the SDK would), and through promptbatch's ``/v1/chat/completions`` with
``stream: true`` (embedded Valkey, SQLite, scheduler, a worker of 2 processes, the API;
the ``openai`` provider streams from the server inside the batch), idle, then under a
bulk backlog of echo jobs that keeps the workers busy (each batch takes 0.5 s: the echo test
hook, turned on for this run), for a critical and a normal call.
Time to first token (the first content chunk) and end to end (``[DONE]``), p50 and p99,
in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import Children, child_env, migrated, promptbatch_argv, table, wait_for_workers
from config.settings import Settings
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port
from tests.fake_llm import FakeServer


def one_call(http: httpx.Client, url: str, body: dict[str, object],
             headers: dict[str, str]) -> tuple[float, float]:
    """(time to first content chunk, time to [DONE]) of one streamed call, in ms."""
    start = time.perf_counter()
    first = None
    with http.stream("POST", url, json=body, headers=headers) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if first is None and any((c.get("delta") or {}).get("content")
                                     for c in chunk.get("choices") or ()):
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None, "no content streamed"
    return (first - start) * 1000, (end - start) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--backlog", type=int, default=3000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pb-stream-") as d, FakeServer() as fake:
        tmp = Path(d)
        fake.token_delay_s = 0.02
        fake.stream_words = 20
        body = {"model": "gpt-test", "stream": True,
                "messages": [{"role": "user", "content": "Tell me a story"}]}
        with httpx.Client(timeout=60) as http:
            for _ in range(3):
                one_call(http, f"{fake.url}/v1/chat/completions", body, {})
            direct = [one_call(http, f"{fake.url}/v1/chat/completions", body, {})
                      for _ in range(args.calls)]
        rows.append(("direct to the server", "-", *summary(direct), "-"))
        base_ttft = statistics.median(t for t, _ in direct)
        with EmbeddedRedis(tmp / "redis") as server:
            s = migrated(Settings(redis_url=server.url,
                                  database_url=f"sqlite:///{tmp / 'jobs.db'}",
                                  _env_file=None))  # type: ignore[call-arg]
            env = child_env(s, PROMPTBATCH_OPENAI_BASE_URL=f"{fake.url}/v1",
                            PROMPTBATCH_ECHO_TEST_HOOKS="1",  # a backlog batch takes 0.5 s
                            PROMPTBATCH_API_KEYS=json.dumps({"bench": "default"}),
                            PROMPTBATCH_MODEL_ALIASES=json.dumps({"gpt-test":
                                                                  "openai|gpt-test"}))
            kids = Children(tmp)
            port = free_port()
            try:
                kids.start("scheduler", promptbatch_argv("scheduler"), env)
                kids.start("worker", promptbatch_argv("worker", "--concurrency", "2",
                                                      "--loglevel", "warning"), env)
                kids.start("api", promptbatch_argv("api", "--port", str(port)), env)
                wait_for_workers(s.redis_url, 2)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                auth = {"Authorization": "Bearer bench"}
                with httpx.Client(timeout=120) as http:
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        try:
                            if http.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                                break
                        except httpx.HTTPError:
                            time.sleep(0.1)
                    for _ in range(3):
                        one_call(http, url, body, auth)
                    idle = [one_call(http, url, body, {**auth, "X-Priority": "normal"})
                            for _ in range(args.calls)]
                    rows.append(("promptbatch, idle", "normal", *summary(idle),
                                 f"+{statistics.median(t for t, _ in idle) - base_ttft:.1f}"))
                    with Client(s) as client:  # a backlog that keeps both workers busy
                        client.submit_many([{"prompt": f"bulk {i} [echo:sleep=0.5]",
                                             "priority": "bulk"}
                                            for i in range(args.backlog)])
                        for cls in ("critical", "normal"):
                            busy = [one_call(http, url, body, {**auth, "X-Priority": cls})
                                    for _ in range(args.calls // 2)]
                            added = statistics.median(t for t, _ in busy) - base_ttft
                            rows.append((f"promptbatch, {args.backlog} bulk jobs queued", cls,
                                         *summary(busy), f"+{added:.1f}"))
            finally:
                kids.stop()
    table(f"streaming: {args.calls} calls of 20 words, 20 ms apart (ms)",
          ["route", "class", "TTFT p50", "TTFT p99", "end to end p50", "end to end p99",
           "TTFT p50 added"], rows)


def summary(samples: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    ttft = [t for t, _ in samples]
    total = [e for _, e in samples]
    return (round(statistics.median(ttft), 1), round(pct(ttft, 99), 1),
            round(statistics.median(total), 1), round(pct(total, 99), 1))


if __name__ == "__main__":
    main()

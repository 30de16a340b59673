"""A soak: a month of production compressed into one run, checked for bounded growth.

One embedded Valkey (AOF on) pre-filled with ``--keys`` keys named like Celery result
metas (a week of history), a SQLite job store, and the README's services: one scheduler,
one worker (``--workers`` processes) and the HTTP API. Then ``--jobs`` jobs go through:

* bulk: ``submit_many`` in chunks of 1,000 from this process, keeping at most
  ``--window`` jobs pending (the offered load follows the service, so each tenth of the
  jobs measures what the service can do at that point of the run); 2% are repeats of a
  few deterministic prompts (the exact cache and coalescing);
* interactive: critical and high jobs posted one by one to the API from a thread, one
  in ten streamed to its end through ``GET /v1/jobs/{id}/stream``.

Time is compressed so that what a month accumulates happens here: results and cached
answers live ``--ttl`` seconds in Redis, and the job store keeps final jobs for
``--retention`` minutes (the active scheduler deletes older ones between its ticks).

The measured million starts after a warm-up of ``--ttl`` seconds (or ``--retention``,
if longer) plus a minute: until then results only accumulate (nothing has expired and
nothing is old enough to purge), so the service does less work per job than it will for
the rest of its life, and a first tenth taken then would not compare like with like
(the warm-up's rate is printed too).

Printed: the jobs/s of each tenth of the jobs and the last against the first (target
at least 0.9); each process's RSS sampled every second, its median and peak over the
first and over the last tenth (target: growth under 10%); SQL rows, the SQLite file and
Redis's memory at the end.

    .venv/bin/python bench/soak.py [--jobs 1000000] [--keys 10000000] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, child_env, promptbatch_argv, table, wait_for_workers
from config import keys
from config.settings import Settings
from jobs.stats import read_totals
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port

KEY = "soak-key"


def finished_total(r: Any) -> int:
    return sum(c.value for c in read_totals(r) if c.kind == "finished")


class Interactive(threading.Thread):
    """Critical and high jobs through the API, one in ten streamed to its end."""

    def __init__(self, api: str, stop: threading.Event, every_s: float) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.stop = stop
        self.every_s = every_s
        self.sent = self.streamed = self.ended = self.errors = 0
        self.refused: Counter[int] = Counter()  #: answers other than 201, by status

    def run(self) -> None:
        with httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                stream = i % 10 == 0
                body = {"prompt": f"Customer {i % 5000} asks: where is my order {i}?",
                        "priority": "critical" if i % 2 else "high", "timeout_s": 60,
                        "stream": stream, "tenant": "web"}
                resp = http.post("/v1/jobs", json=body)
                if resp.status_code != 201:
                    self.errors += 1
                    self.refused[resp.status_code] += 1
                    continue
                self.sent += 1
                if stream:
                    self.streamed += 1
                    with http.stream("GET", f"/v1/jobs/{resp.json()['id']}/stream") as sse:
                        if any(line.startswith("event: end") for line in sse.iter_lines()):
                            self.ended += 1
                self.stop.wait(self.every_s)


class Sampler(threading.Thread):
    """Samples each process's RSS every second; ``cut`` returns the median and peak of
    the samples since the last cut, in MB."""

    def __init__(self, procs: dict[str, psutil.Process], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.stop = stop
        self.lock = threading.Lock()
        self.samples: dict[str, list[int]] = {k: [] for k in procs}

    def run(self) -> None:
        while not self.stop.wait(1.0):
            now = rss_of(self.procs)
            with self.lock:
                for k, v in now.items():
                    self.samples[k].append(v)

    def cut(self) -> dict[str, tuple[int, int]]:
        with self.lock:
            out = {k: (int(statistics.median(v)) if v else -1, max(v, default=-1))
                   for k, v in self.samples.items()}
            self.samples = {k: [] for k in self.procs}
        return out


def rss_of(procs: dict[str, psutil.Process]) -> dict[str, int]:
    """Resident memory of each process, in MB (the worker's pool processes by position)."""
    out: dict[str, int] = {}
    for name, proc in procs.items():
        try:
            out[name] = proc.memory_info().rss // 2**20
        except psutil.NoSuchProcess:
            out[name] = -1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=int, default=20_000,
                        help="most bulk jobs pending at once")
    parser.add_argument("--ttl", type=int, default=120, help="result and cache TTL, s")
    parser.add_argument("--retention", type=float, default=2.0, help="minutes")
    parser.add_argument("--interactive-every", type=float, default=0.05,
                        help="seconds between two interactive requests")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pb-soak-"))
    server = EmbeddedRedis(tmp / "valkey", extra_args=["--enable-debug-command", "yes"])
    server.start()
    s = Settings(redis_url=server.url, database_url=f"sqlite:///{tmp / 'jobs.db'}",
                 _env_file=None)  # type: ignore[call-arg]
    JobStore(s.database_url).migrate()
    import redis

    r = redis.Redis.from_url(s.redis_url, decode_responses=True, socket_timeout=600)
    t0 = time.perf_counter()
    if args.keys:
        r.execute_command(  # type: ignore[no-untyped-call]
            "DEBUG", "POPULATE", args.keys, "celery-task-meta-week", 200)
    print(f"filled Redis with {args.keys:,} keys in {time.perf_counter() - t0:.0f} s; "
          f"used memory {int(r.info('memory')['used_memory']) // 2**20} MB", flush=True)
    env = child_env(s, PROMPTBATCH_RETENTION_DAYS=str(args.retention / 1440),
                    PROMPTBATCH_RETENTION_INTERVAL_S="10",
                    PROMPTBATCH_RESULT_TTL_S=str(args.ttl),
                    PROMPTBATCH_CACHE_TTL_S=str(args.ttl),
                    PROMPTBATCH_MAX_PENDING_PER_TENANT=str(args.window * 2),
                    PROMPTBATCH_API_KEYS=json.dumps({KEY: "web"}))
    kids = Children(tmp)
    port = free_port()
    sched = kids.start("scheduler", promptbatch_argv("scheduler"), env)
    worker = kids.start("worker", promptbatch_argv("worker", "--concurrency",
                                                   str(args.workers), "--loglevel", "warning"),
                        env)
    api = kids.start("api", promptbatch_argv("api", "--port", str(port)), env)
    stop = threading.Event()
    try:
        wait_for_workers(s.redis_url, args.workers)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        procs = {"scheduler": psutil.Process(sched.pid), "worker": psutil.Process(worker.pid),
                 "api": psutil.Process(api.pid), "valkey": psutil.Process(server.proc.pid)
                 if server.proc else psutil.Process(), "producer": psutil.Process(os.getpid())}
        for i, child in enumerate(procs["worker"].children()):
            procs[f"worker pool {i + 1}"] = child
        interactive = Interactive(f"http://127.0.0.1:{port}", stop, args.interactive_every)
        interactive.start()
        settings = s.model_copy(update={"max_pending_per_tenant": args.window * 2})
        tenth = args.jobs // 10
        warmup_s = max(args.ttl, args.retention * 60) + 60
        sampler = Sampler(procs, stop)
        sampler.start()
        started = time.perf_counter()
        marks: list[tuple[float, int]] = []
        rss: list[dict[str, tuple[int, int]]] = []
        submitted = 0
        det = {"params": {"temperature": 0}}
        with Client(settings) as client:
            while True:
                done = finished_total(r)
                now = time.perf_counter()
                if not marks and now - started >= warmup_s:
                    marks.append((now, done))
                    sampler.cut()
                    print(f"warm-up: {done:,} jobs in {now - started:.0f} s "
                          f"({done / (now - started):,.0f} jobs/s); measuring the next "
                          f"{args.jobs:,}", flush=True)
                elif marks and done - marks[0][1] >= tenth * len(marks):
                    marks.append((now, done))
                    rss.append(sampler.cut())
                    rate = tenth / (marks[-1][0] - marks[-2][0])
                    waiting = r.scard(keys.tenant_pending("batch"))
                    print(f"tenth {len(marks) - 1}: {rate:,.0f} jobs/s; {waiting:,} bulk jobs "
                          "waiting; RSS median/peak "
                          + ", ".join(f"{k} {a}/{b}" for k, (a, b) in rss[-1].items()),
                          flush=True)
                    if len(marks) > 10:
                        break
                total = submitted + interactive.sent
                if total - done < args.window:
                    n = 1000
                    client.submit_many(
                        ({"prompt": f"Repeat question {(i // 50) % 20}", "priority": "bulk",
                          "tenant": "batch", **det} if i % 50 == 0 else
                         {"prompt": f"Summarise ticket {submitted + i}: printer jam on floor "
                                    f"{i % 9}", "priority": "bulk", "tenant": "batch"})
                        for i in range(n))
                    submitted += n
                else:
                    time.sleep(0.05)  # the service is at its window: let it work
        stop.set()
        interactive.join(30)
        store = JobStore(s.database_url)
        rows = store.count_by_state()
        with store.engine.connect() as conn:
            from sqlalchemy import text

            batches = conn.execute(text("SELECT COUNT(*) FROM batches")).scalar_one()
        store.close()
        memory = r.info("memory")
        rates = [tenth / (b[0] - a[0]) for a, b in itertools.pairwise(marks)]
        table(f"soak: {args.jobs:,} jobs measured after the warm-up, "
              f"{interactive.sent:,} interactive "
              f"({interactive.streamed:,} streamed, {interactive.ended:,} ended), "
              f"{args.keys:,} other keys in Redis, {args.workers} worker processes",
              ["tenth", "jobs/s"], [(str(i + 1), rate) for i, rate in enumerate(rates)])
        print(f"last tenth / first tenth: {rates[-1] / rates[0]:.2f} (target >= 0.9)")
        first, last = rss[0], rss[-1]
        table("RSS (MB) over the first and the last tenth, median and peak of 1 s samples",
              ["process", "first: median", "peak", "last: median", "peak", "growth"],
              [(k, first[k][0], first[k][1], last[k][0], last[k][1],
                f"{100.0 * (last[k][0] - first[k][0]) / max(1, first[k][0]):+.1f}%")
               for k in first])
        table("at the end", ["what", "value"], [
            ("SQL job rows", str(sum(rows.values()))), ("SQL rows by state", json.dumps(rows)),
            ("SQL batch records", str(batches)),
            ("SQLite file MB", str((tmp / "jobs.db").stat().st_size // 2**20)),
            ("Redis used memory MB", str(int(memory["used_memory"]) // 2**20)),
            ("Redis keys", f"{r.dbsize():,}"),
            ("interactive requests refused", f"{interactive.errors} "
                                             f"{dict(interactive.refused)}"),
            ("keys SCAN/KEYS calls", str(sum(int(v.get("calls", 0)) for k, v in
                                           r.info("commandstats").items()
                                           if k in ("cmdstat_scan", "cmdstat_keys")))),
            ("pending in intake", str(r.xlen(keys.INTAKE)))])
    finally:
        stop.set()
        kids.stop()
        r.close()
        server.stop()


if __name__ == "__main__":
    main()

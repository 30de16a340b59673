"""End-to-end throughput: promptbatch batches vs one Celery task per prompt.

All run on an embedded server of their own, with the same worker pool (prefork,
``--workers`` processes), in one command:

    .venv/bin/python bench/pipeline.py [--jobs 10000] [--workers 2]
    .venv/bin/python bench/pipeline.py --metrics-cost [--rounds 3]

Rows: submit only (one ``Client.submit_many`` call into Redis and the store), promptbatch
end to end on each job store (``--stores sqlite postgres``: SQLite and a PostgreSQL server
started for the run) (submit, schedule, batch, run with the echo provider, one result per
job collected) in three configurations (``--configs``, ``CONFIGS``): the defaults with
every job in one ``submit_many`` call (all or nothing: no job runs before the call
returns); ``submit_many`` per 1,000 jobs, as a producer streaming its input calls it (the
first jobs run while the next are submitted, as the baselines' first tasks do); and that
with batches of up to 256 (``max_batch_size``, a setting for cheap bulk work), and two
baselines of one Celery task per prompt (``send_task`` per prompt on
one producer connection, results collected by MGET polling of the oldest 1,000 pending,
which is faster than ``ResultSet.get``): *tuned*, the one a Celery user would pick for
throughput (Celery's defaults: early acks, prefetch 4, no task events;
``bench/baseline_tuned_app.py``), run on kombu's Redis transport and on promptbatch's
(``config/transport.py``, which publishes through one client), the faster of which the
ratio is against, and one with promptbatch's worker settings (events, late acks, prefetch
1; ``bench/baseline_app.py``).

``--metrics-cost``: promptbatch on SQLite with its Prometheus endpoints served (the
scheduler's, and the worker's in multiprocess mode) and scraped every second, against the
same without them, alternating, ``--rounds`` times each; the median of each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, child_env, migrated, promptbatch_argv, table, wait_for_workers
from config.settings import Settings
from jobs.queue import connect
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port


def prompts(n: int) -> list[str]:
    templates = ["Summarise this support ticket in one line: customer {i} cannot log in",
                 "Translate to French: order {i} has shipped and arrives on Monday",
                 "Classify the sentiment of review {i}: the kettle is great but loud"]
    return [templates[i % 3].format(i=i) for i in range(n)]


#: How promptbatch runs in the table: (row label, jobs per ``submit_many`` call (0: all in
#: one call), most jobs per batch).
CONFIGS = {
    "default": ("one submit_many call, batches of up to 32 (the defaults)", 0, 32),
    "streamed": ("submit_many per 1,000 jobs, batches of up to 32", 1000, 32),
    "bulk": ("submit_many per 1,000 jobs, batches of up to 256", 1000, 256),
}


def run_promptbatch(settings: Settings, texts: list[str], workers: int, tmp: Path,
                    metrics: bool = False, chunk: int = 0,
                    batch_size: int = 32) -> tuple[float, float, int]:
    """Submit ``texts`` (in calls of ``chunk`` jobs; 0: one call) and wait for every
    result; return (seconds until all were submitted, seconds until all results were
    read, batches)."""
    kids = Children(tmp)
    env = child_env(settings, PROMPTBATCH_MAX_BATCH_SIZE=str(batch_size))
    ports = [free_port(), free_port()] if metrics else [0, 0]
    stop = threading.Event()
    try:
        kids.start("scheduler", promptbatch_argv("scheduler", "--metrics-port", str(ports[0])),
                   env)
        kids.start("worker", promptbatch_argv("worker", "--concurrency", str(workers),
                                              "--loglevel", "warning",
                                              "--metrics-port", str(ports[1])), env)
        wait_for_workers(settings.redis_url, workers)
        if metrics:  # as a Prometheus would, but every second instead of every 15
            threading.Thread(target=_scrape, args=(ports, stop), daemon=True).start()
        with Client(settings) as client:
            t0 = time.perf_counter()
            ids: list[str] = []
            step = chunk or len(texts)
            for start in range(0, len(texts), step):
                ids += client.submit_many({"prompt": t} for t in texts[start:start + step])
            t_submit = time.perf_counter() - t0
            results = list(client.results(ids, timeout=600))
            total = time.perf_counter() - t0
        assert len({r.id for r in results}) == len(texts)
        assert all(r.state.value == "SUCCEEDED" for r in results)
        batches = len({r.batch_id for r in results})
        return t_submit, total, batches
    finally:
        stop.set()
        kids.stop()


def _scrape(ports: list[int], stop: threading.Event) -> None:
    with httpx.Client(timeout=5) as http:
        while not stop.wait(1.0):
            for port in ports:
                http.get(f"http://127.0.0.1:{port}/metrics").raise_for_status()


def metrics_cost(texts: list[str], workers: int, rounds: int, tmp: Path) -> None:
    """promptbatch with metrics served and scraped vs without, alternating."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(rounds):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            with EmbeddedRedis(tmp / f"redis-m{i}{on}") as server:
                s = Settings(redis_url=server.url,
                             database_url=f"sqlite:///{tmp / f'm{i}{on}.db'}",
                             _env_file=None)  # type: ignore[call-arg]
                migrated(s)
                times[on].append(run_promptbatch(s, texts, workers, tmp, metrics=on)[1])
    n = len(texts)
    t_off, t_on = statistics.median(times[False]), statistics.median(times[True])
    table(f"metrics cost: {n} echo jobs, {workers} worker processes, median of {rounds}",
          ["run", "jobs", "seconds", "jobs/s", "vs off"],
          [("metrics off (no endpoints)", n, t_off, n / t_off, "1.00x"),
           ("metrics on (served, scraped every 1 s)", n, t_on, n / t_on,
            f"{t_off / t_on:.3f}x")])
    print("all runs (s): off " + ", ".join(f"{t:.2f}" for t in times[False]) +
          "; on " + ", ".join(f"{t:.2f}" for t in times[True]))


def run_baseline(settings: Settings, texts: list[str], workers: int, tmp: Path,
                 tuned: bool = False, transport: str = "kombu") -> float:
    """One Celery task per prompt: with promptbatch's worker settings, or (``tuned``)
    with Celery's defaults tuned for throughput (``bench/baseline_tuned_app.py``), on
    kombu's Redis transport or (``transport="promptbatch"``) promptbatch's."""
    os.environ["PROMPTBATCH_REDIS_URL"] = settings.redis_url
    os.environ["TUNED_TRANSPORT"] = transport
    if tuned:
        import bench.baseline_tuned_app

        app = importlib.reload(bench.baseline_tuned_app).app  # this run's transport
        module, queue, task = "bench.baseline_tuned_app", "tuned", "tuned.echo_one"
    else:
        from bench.baseline_app import app
        module, queue, task = "bench.baseline_app", "baseline", "baseline.echo_one"
    kids = Children(tmp)
    env = child_env(settings)
    try:
        kids.start(f"{queue}-worker", [sys.executable, "-m", "celery", "-A", module,
                                       "worker", "-Q", queue, "-c", str(workers), "-l",
                                       "warning", "--without-mingle", "--without-gossip"], env)
        r = connect(settings.redis_url)
        # Wait for the worker with a first task.
        app.send_task(task, args=["warm-up"]).get(timeout=60, interval=0.05)
        t0 = time.perf_counter()
        # Sent through one producer connection, as a bulk submitter would.
        with app.producer_or_acquire() as producer:
            ids = [app.send_task(task, args=[t], producer=producer).id for t in texts]
        # Tasks run about in the order they were sent: read the oldest 1,000 pending
        # results at a time (reading all 10,000 keys every few ms costs the server more
        # than the tasks themselves).
        pending = [f"celery-task-meta-{i}" for i in ids]
        while pending:
            head = pending[:1000]
            found = r.mget(head)
            left = [k for k, v in zip(head, found, strict=True)
                    if v is None or json.loads(v)["status"] != "SUCCESS"]
            if len(left) == len(head):
                time.sleep(0.002)
            pending = left + pending[1000:]
        return time.perf_counter() - t0
    finally:
        kids.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep logs and data")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgres"],
                        choices=["sqlite", "postgres"],
                        help="job stores to run promptbatch on (PostgreSQL: a server "
                        "started from the binaries tests/pg.py finds)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="how promptbatch is run (SQLite; PostgreSQL runs the first "
                        "and the last): " + "; ".join(f"{k}: {v[0]}" for k, v in CONFIGS.items()))
    parser.add_argument("--metrics-cost", action="store_true",
                        help="compare metrics served and scraped with none (SQLite)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, --metrics-cost")
    args = parser.parse_args()
    texts = prompts(args.jobs)
    with tempfile.TemporaryDirectory(prefix="pb-bench-") as d:
        tmp = Path(d)
        if args.keep:  # logs and data outlive the run
            tmp = Path(tempfile.mkdtemp(prefix="pb-bench-"))
            print(f"logs and data in {tmp}")
        if args.metrics_cost:
            metrics_cost(texts, args.workers, args.rounds, tmp)
            return
        rows = []
        runs: list[tuple[str, str, float, float, int]] = []
        for store in args.stores:
            configs = args.configs if store == "sqlite" else sorted(
                {args.configs[0], args.configs[-1]}, key=args.configs.index)
            for config in configs:
                _, chunk, size = CONFIGS[config]
                with contextlib.ExitStack() as stack:
                    server = stack.enter_context(EmbeddedRedis(tmp / f"redis-{store}-{config}"))
                    if store == "postgres":
                        from tests.pg import PostgresServer

                        pg = PostgresServer().start()
                        stack.callback(pg.stop)
                        url = pg.create_database()
                    else:
                        url = f"sqlite:///{tmp / f'{config}.db'}"
                    s = Settings(redis_url=server.url, database_url=url,
                                 _env_file=None)  # type: ignore[call-arg]
                    migrated(s)
                    runs.append((store, config, *run_promptbatch(
                        s, texts, args.workers, tmp, chunk=chunk, batch_size=size)))
        baselines: dict[str, float] = {}
        for name, tuned, transport in (("ours", False, "kombu"), ("tuned", True, "kombu"),
                                       ("tuned+", True, "promptbatch")):
            with EmbeddedRedis(tmp / f"b-{name}") as server:
                s = Settings(redis_url=server.url, database_url=f"sqlite:///{tmp / 'b.db'}",
                             _env_file=None)  # type: ignore[call-arg]
                baselines[name] = run_baseline(s, texts, args.workers, tmp, tuned=tuned,
                                               transport=transport)
        base = min(baselines["tuned"], baselines["tuned+"])  # the faster tuned baseline
        n = args.jobs
        names = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
        for store, config, t_submit, _, _ in runs:
            if CONFIGS[config][1] == 0:  # nothing runs while the one call submits
                rows.append((f"submit only (Redis + {names[store]})", n, t_submit,
                             n / t_submit, "-"))
        for store, config, _, total, batches in runs:
            rows.append((f"promptbatch, {names[store]}, {CONFIGS[config][0]} ({batches} "
                         "batches)", n, total, n / total, f"{base / total:.2f}x"))
        rows.append(("one Celery task per prompt, tuned (Celery defaults, prefetch 4, "
                     "no events)", n, baselines["tuned"], n / baselines["tuned"],
                     f"{base / baselines['tuned']:.2f}x"))
        rows.append(("the same, on promptbatch's broker transport (config/transport.py)", n,
                     baselines["tuned+"], n / baselines["tuned+"],
                     f"{base / baselines['tuned+']:.2f}x"))
        rows.append(("one Celery task per prompt, promptbatch's worker settings", n,
                     baselines["ours"], n / baselines["ours"], f"{base / baselines['ours']:.2f}x"))
        table(f"pipeline: {n} echo jobs, {args.workers} worker processes",
              ["run", "jobs", "seconds", "jobs/s", "vs baseline"], rows)


if __name__ == "__main__":
    main()

"""A Redis that holds a week of results: the service's speed with millions of other keys.

For each size, in one command, alternating: a fresh embedded Valkey (AOF on, as the
services run it) pre-filled with ``DEBUG POPULATE`` keys named like Celery result metas
(a week of history at ~16 jobs/s with the 7-day ``result_ttl_s`` is ~10,000,000), a
SQLite file, the README's services (one scheduler, one worker with ``--workers``
processes); then ``--jobs`` echo jobs are submitted with ``submit_many`` and the time
until every one is final is measured from the client. Baseline: the same on an empty
server, in the same command. Also printed: the server's SCAN and KEYS calls over the run
(``INFO commandstats``), which must be none.

    .venv/bin/python bench/keyspace.py [--keys 0 10000000] [--jobs 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, child_env, promptbatch_argv, table, wait_for_workers
from config import keys
from config.settings import Settings
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis


def run(n_keys: int, jobs: int, workers: int, tmp: Path) -> tuple[float, float, int]:
    """(seconds to fill, seconds until every job is final, SCAN + KEYS calls)."""
    server = EmbeddedRedis(tmp / "valkey", extra_args=["--enable-debug-command", "yes"])
    with server:
        s = Settings(redis_url=server.url, database_url=f"sqlite:///{tmp / 'jobs.db'}",
                     _env_file=None)  # type: ignore[call-arg]
        JobStore(s.database_url).migrate()
        import redis

        r = redis.Redis.from_url(s.redis_url, decode_responses=True, socket_timeout=600)
        t0 = time.perf_counter()
        if n_keys:
            r.execute_command("DEBUG", "POPULATE", n_keys, "celery-task-meta-week", 200)
        filled = time.perf_counter() - t0
        r.config_resetstat()
        kids = Children(tmp)
        env = child_env(s)
        try:
            kids.start("scheduler", promptbatch_argv("scheduler"), env)
            kids.start("worker", promptbatch_argv("worker", "--concurrency", str(workers),
                                                  "--loglevel", "warning"), env)
            wait_for_workers(s.redis_url, workers)
            while not r.get(keys.SCHEDULER_LEASE):
                time.sleep(0.05)
            with Client(s) as client:
                t0 = time.perf_counter()
                ids = client.submit_many({"prompt": f"Route support ticket {i}"}
                                         for i in range(jobs))
                assert len(list(client.results(ids, timeout=900))) == jobs
                elapsed = time.perf_counter() - t0
            stats = r.info("commandstats")
            scans = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                        for c in ("scan", "keys"))
            return filled, elapsed, scans
        finally:
            kids.stop()
            r.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, nargs="+", default=[0, 10_000_000])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[int, list[float]] = {k: [] for k in args.keys}
    fills: dict[int, float] = {}
    scans: dict[int, int] = {}
    for _ in range(args.rounds):
        for n in args.keys:
            with tempfile.TemporaryDirectory(prefix="pb-keyspace-") as d:
                fills[n], elapsed, scans[n] = run(n, args.jobs, args.workers, Path(d))
            times[n].append(elapsed)
    base = min(times[min(args.keys)])
    rows = [(f"{n:,}", f"{fills[n]:.1f}", " / ".join(f"{t:.2f}" for t in times[n]),
             args.jobs / min(times[n]), f"{min(times[n]) / base:.2f}x", scans[n])
            for n in args.keys]
    table(f"{args.jobs:,} echo jobs, {args.workers} worker processes, Redis pre-filled",
          ["keys in Redis", "fill s", "all final s (each round)", "jobs/s (best)",
           "vs the fewest keys", "SCAN+KEYS calls"], rows)


if __name__ == "__main__":
    main()

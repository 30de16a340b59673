"""A scheduler started on a backlog: time to the first batch and drain rate.

For each backlog size, in one command: a fresh embedded server and SQLite file; the jobs
are submitted while no scheduler runs (as after an outage or a deploy); a worker with
``--workers`` processes is started, then the scheduler. Measured: seconds from starting
the scheduler process to its first batch, then the drain rate (jobs final per second, from
the SQL store) over ``--window`` seconds, and the scheduler's peak memory. Baseline, in
the same command: the same stack with the scheduler already running when the same number
of jobs arrives at once (its normal rate over the same window).

    .venv/bin/python bench/backlog.py [--jobs 100000 1000000] [--workers 2] [--window 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, child_env, promptbatch_argv, table, wait_for_workers
from config import keys
from config.settings import Settings
from jobs.queue import connect
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis

CLASSES = ("critical", "high", "normal", "low", "bulk")
FINAL = ("SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED")


def submit(settings: Settings, n: int) -> float:
    """Submit ``n`` echo jobs (mostly bulk, every class present, three tenants)."""
    t0 = time.perf_counter()
    with Client(settings) as client:
        for start in range(0, n, 10_000):
            client.submit_many({"prompt": f"Tag support ticket {i}: the printer is jammed",
                                "priority": CLASSES[i % 5] if i % 100 == 0 else "bulk",
                                "tenant": f"tenant-{i % 3}"}
                               for i in range(start, min(n, start + 10_000)))
    return time.perf_counter() - t0


def final_count(store: JobStore) -> int:
    return sum(v for k, v in store.count_by_state().items() if k in FINAL)


def measure(n: int, workers: int, window: float, tmp: Path, restart: bool,
            extra_env: dict[str, str],
            ) -> tuple[float | None, float, int, float]:
    """(seconds to first batch, drain jobs/s over the window, scheduler peak RSS MB,
    submit seconds). ``restart``: submit first, then start the scheduler."""
    with EmbeddedRedis(tmp / "valkey") as server:
        s = Settings(redis_url=server.url, database_url=f"sqlite:///{tmp / 'jobs.db'}",
                     _env_file=None)  # type: ignore[call-arg]
        JobStore(s.database_url).migrate()
        kids = Children(tmp)
        env = child_env(s, **extra_env)
        r = connect(s.redis_url)
        store = JobStore(s.database_url)
        try:
            kids.start("worker", promptbatch_argv("worker", "--concurrency", str(workers),
                                                  "--loglevel", "warning"), env)
            wait_for_workers(s.redis_url, workers)
            first: float | None = None
            if restart:
                t_submit = submit(s, n)
                t0 = time.perf_counter()
                sched = kids.start("scheduler", promptbatch_argv("scheduler"), env)
                while time.perf_counter() - t0 < 120:
                    if r.zcard(keys.INFLIGHT) or r.xlen(keys.INTAKE) < n:
                        first = time.perf_counter() - t0
                        break
                    time.sleep(0.01)
            else:
                sched = kids.start("scheduler", promptbatch_argv("scheduler"), env)
                while not r.get(keys.SCHEDULER_LEASE):
                    time.sleep(0.05)
                t_submit = submit(s, n)
            peak = 0
            start_done, t_start = final_count(store), time.perf_counter()
            done = start_done
            while time.perf_counter() - t_start < window and done < n:
                time.sleep(1)  # sampling the drain, not waiting for a result
                done = final_count(store)
                peak = max(peak, psutil.Process(sched.pid).memory_info().rss)
            rate = (done - start_done) / (time.perf_counter() - t_start)
            return first, rate, peak // 2**20, t_submit
        finally:
            kids.stop()
            store.close()
            r.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=float, default=60.0,
                        help="seconds over which the drain rate is measured")
    parser.add_argument("--pool", type=int, default=None,
                        help="PROMPTBATCH_MAX_POOL_JOBS (default: the setting's default)")
    args = parser.parse_args()
    extra = {} if args.pool is None else {"PROMPTBATCH_MAX_POOL_JOBS": str(args.pool)}
    rows = []
    for n in args.jobs:
        with tempfile.TemporaryDirectory(prefix="pb-backlog-") as d:
            first, rate, peak, t_submit = measure(n, args.workers, args.window,
                                                  Path(d), restart=True, extra_env=extra)
        with tempfile.TemporaryDirectory(prefix="pb-backlog-") as d:
            _, normal, normal_peak, _ = measure(n, args.workers, args.window, Path(d),
                                                restart=False, extra_env=extra)
        rows.append((f"{n:,} pending, scheduler started after", f"{t_submit:.0f}",
                     "-" if first is None else f"{first:.2f}", rate, f"{peak}",
                     f"{rate / normal:.2f}x"))
        rows.append((f"{n:,} arriving, scheduler already running", f"{t_submit:.0f}", "-",
                     normal, f"{normal_peak}", "1.00x"))
    table(f"backlog restart: echo jobs, {args.workers} worker processes, drain over "
          f"{args.window:.0f} s", ["run", "submit s", "first batch s", "drain jobs/s",
                                   "scheduler peak MB", "vs normal"], rows)


if __name__ == "__main__":
    main()

"""How many jobs/s one Redis primary can carry, measured with the server's own time.

The README's services (one scheduler, one worker with ``--workers`` processes, the echo
provider) on an embedded Valkey run ``--jobs`` jobs submitted in chunks of 1,000 from this
process, every result collected. The server's own accounts give its time per job: the
CPU of its main thread over the run (``INFO cpu``: the thread every command runs on),
and ``INFO commandstats`` per command (Lua steps, the broker's and the result backend's
commands; a command a script runs is counted under its own name as well as in the
script's ``evalsha``, and reading and writing the network and the AOF are in no
command: the main thread's CPU is the measure). One primary, single-threaded, carries
at most a million over the main thread's microseconds per job jobs/s. Printed beside
the jobs/s the one scheduler actually sent in the same run: the headroom a team has on one
primary before the scheduler, not Redis, is the limit.

    .venv/bin/python bench/redis_primary.py [--jobs 100000] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, child_env, promptbatch_argv, table, wait_for_workers
from config import keys
from config.settings import Settings
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis


def _main_thread_cpu(r: Any) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])


def run(jobs: int, workers: int, tmp: Path,
        ) -> tuple[float, float, dict[str, dict[str, float]]]:
    """(wall seconds, the server's main-thread CPU seconds, commandstats) of ``jobs`` echo
    jobs through the services."""
    server = EmbeddedRedis(tmp / "valkey")
    server.start()
    s = Settings(redis_url=server.url, database_url=f"sqlite:///{tmp / 'jobs.db'}",
                 _env_file=None)  # type: ignore[call-arg]
    JobStore(s.database_url).migrate()
    import redis

    r = redis.Redis.from_url(s.redis_url, decode_responses=True)
    kids = Children(tmp)
    env = child_env(s, PROMPTBATCH_MAX_PENDING_PER_TENANT=str(jobs + 1000))
    try:
        kids.start("scheduler", promptbatch_argv("scheduler"), env)
        kids.start("worker", promptbatch_argv("worker", "--concurrency", str(workers),
                                              "--loglevel", "warning"), env)
        wait_for_workers(s.redis_url, workers)
        while not r.get(keys.SCHEDULER_LEASE):
            time.sleep(0.05)  # the scheduler is taking its lease: no job is lost meanwhile
        r.config_resetstat()
        cpu0 = _main_thread_cpu(r)
        with Client(s.model_copy(update={"max_pending_per_tenant": jobs + 1000})) as client:
            t0 = time.perf_counter()
            ids: list[str] = []
            for start in range(0, jobs, 1000):
                ids += client.submit_many({"prompt": f"Route support ticket {i}: the printer "
                                           f"on floor {i % 9} is jammed", "priority": "bulk"}
                                          for i in range(start, min(jobs, start + 1000)))
            assert len(list(client.results(ids, timeout=1800))) == jobs
            elapsed = time.perf_counter() - t0
        cpu = _main_thread_cpu(r) - cpu0
        raw: Any = r.info("commandstats")
        return elapsed, cpu, {k.removeprefix("cmdstat_"): v for k, v in raw.items()}
    finally:
        kids.stop()
        r.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pb-primary-") as d:
        elapsed, cpu, stats = run(args.jobs, args.workers, Path(d))
    total_us = sum(float(v.get("usec", 0)) for v in stats.values())
    per_job = cpu * 1e6 / args.jobs
    top = sorted(stats.items(), key=lambda kv: -float(kv[1].get("usec", 0)))[:8]
    table(f"server time per command over {args.jobs:,} jobs (INFO commandstats)",
          ["command", "calls", "us per call", "us per job", "share"],
          [(name, f"{int(v['calls']):,}", f"{float(v['usec_per_call']):.1f}",
            f"{float(v['usec']) / args.jobs:.1f}", f"{float(v['usec']) / total_us:.0%}")
           for name, v in top])
    sent = args.jobs / elapsed
    capacity = 1e6 / per_job
    table("one Redis primary against one scheduler",
          ["what", "value"],
          [("server main-thread CPU per job, us", f"{per_job:.1f}"),
           ("sum over commands per job (nested counted twice), us",
            f"{total_us / args.jobs:.1f}"),
           ("jobs/s one primary can carry (1e6 / that)", f"{capacity:,.0f}"),
           ("jobs/s this run sent (one scheduler, "
            f"{args.workers} worker processes)", f"{sent:,.0f}"),
           ("headroom (primary / run)", f"{capacity / sent:.1f}x")])


if __name__ == "__main__":
    main()

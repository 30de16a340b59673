"""What bulk work costs: promptbatch against one request per prompt, in US dollars.

    make bench-cost
    .venv/bin/python bench/cost.py [--jobs 20000] [--families 40] [--repeats 0.1]

Workload: ``--jobs`` bulk jobs (no deadline, temperature 0, ``max_tokens`` 64) over
``--families`` prefix families (a system prompt of about 1,100 tokens each, past OpenAI's
1,024-token threshold for prompt caching, then a short record of its own), a share
``--repeats`` of them exact repeats of an earlier job, in random order, submitted with
``submit_many`` per 1,000 jobs as a producer streaming its input would.

Prices: ``simulated`` is priced as OpenAI's gpt-4o-mini (the price book's default, from
genai-prices: input, cached input, output, and OpenAI's batch discount of 0.5). Runs,
each on its own Valkey and SQLite store:

* **one request per prompt**: the fast path with no cache (``PROMPTBATCH_CACHE_ENABLED=
  false``), one ``process_batch`` task per job in arrival order, claimed through the
  scheduler's claim path (``bench/llm.py``'s baseline), on ``simulated|sim-1``;
* **promptbatch, fast path only**: the scheduler's batches (similar prompts together),
  the exact cache at submit and coalescing on, no batch lane, on ``simulated|sim-1``;
* **promptbatch with the lane**: the same with the half-price lane on (bulk jobs without
  a deadline go there by themselves). ``simulated`` has no batch endpoint, so this run's
  deployment is ``openai|gpt-4o-mini`` with OpenAI's API played by a second promptbatch
  (its own Valkey, job store, HTTP API, scheduler and workers) with ``simulated`` behind
  it and its result cache off, as tests/faults/test_lane_openai.py does: its Batch API
  speaks OpenAI's protocol. The price library cannot price a loopback URL, so
  ``PROMPTBATCH_PRICES`` gives that deployment exactly ``simulated``'s price. Token counts
  come from the same ``simulated`` cost model either way (the same counting rule, a
  prefix cache of the same size in each worker process).

The first two runs call ``simulated`` in our own workers rather than through the second
promptbatch: the cost is the same (same tokens, same price) and a live call through two
stacks on two cores is several times slower (``--fast-via-upstream`` runs them through it
anyway). ``simulated``'s prefix cache (200,000 tokens per worker process) holds every
family, so one request per prompt reads nearly every prefix from it too;
``--server-cache-tokens`` makes it smaller, and the order of the requests then decides what
it holds.

What each run cost and saved is what the system recorded, never this script's own
arithmetic: the SQL spend and savings rows (``jobs.ledger.totals``), the sum of the
results' ``usage.cost_usd``, and the active scheduler's Prometheus counters
``promptbatch_spend_usd_total`` and ``promptbatch_saved_usd_total{reason}`` (scraped
from its ``/metrics``); the three must agree. Durations are modelled at
``--time-scale`` of ``simulated``'s own; the lane's completion window shrinks with it:
provider batches are polled every 1 to 5 seconds (instead of 10 s to 5 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Children, migrated, promptbatch_argv, table, wait_for_workers
from bench.llm import send_baseline
from bench.workload import customer_system_prompt
from config.settings import Settings
from jobs import ledger
from jobs.costs import REASONS
from jobs.models import JobResult, JobState
from jobs.prices import SIMULATED_PRICED_AS, PriceBook
from jobs.store import JobStore
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port

MODEL = "gpt-4o-mini"
DEPLOYMENT = f"openai|{MODEL}"
SIMULATED = ("simulated", "sim-1")
KEY = "pb-bench-cost-upstream"
CHUNK = 1000
BULK = 4
#: The runs: (label, our result cache on, the half-price lane on, the scheduler batches).
RUNS = (("one request per prompt", False, False, False),
        ("promptbatch, fast path only", True, False, True),
        ("promptbatch with the lane", True, True, True))


# --- the workload --------------------------------------------------------------------------

def family_prompt(i: int) -> str:
    """The system prompt of family ``i``: a customer's assistant prompt and the fields to
    extract, about 1,100 tokens."""
    fields = " ".join(f"Field {n}: report the {what} of the record as written, or null."
                      for n, what in enumerate(("customer name", "order number", "amount",
                                                "currency", "date", "product", "quantity",
                                                "complaint", "requested action", "urgency",
                                                "channel", "language", "country"), 1))
    return (f"{customer_system_prompt(i)} You extract fields from the records of desk {i} "
            f"and answer with one JSON object. {fields}")


def workload(n: int, families: int, repeats: float, seed: int = 11) -> list[dict[str, Any]]:
    """``n`` bulk jobs: each a family's system prompt and a request of its own, a share
    ``repeats`` of them an exact copy of an earlier job."""
    rng = random.Random(seed)
    systems = [family_prompt(i) for i in range(families)]
    n_repeats = round(n * repeats)
    repeat_at = set(rng.sample(range(1, n), n_repeats)) if n_repeats else set()
    jobs: list[dict[str, Any]] = []
    originals: list[dict[str, Any]] = []
    for k in range(n):
        if k in repeat_at:
            jobs.append(rng.choice(originals))
            continue
        f = rng.randrange(families)
        job = {"messages": [
            {"role": "system", "content": systems[f]},
            {"role": "user", "content": f"Record {k} of desk {f}: customer #{rng.randrange(10**6)}"
             f" wrote on day {rng.randrange(1, 366)} about order {rng.randrange(10**7)}: the "
             f"parcel arrived {rng.choice(['late', 'damaged', 'incomplete', 'twice'])}."}],
            "priority": "bulk", "params": {"temperature": 0, "max_tokens": 64}}
        jobs.append(job)
        originals.append(job)
    return jobs


# --- the provider: a second promptbatch with simulated behind it ---------------------------

def _env(values: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update({"PROMPTBATCH_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **values})
    return env


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a process started with ``env`` reads."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings(_env_file=None)  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def upstream(run_dir: Path, workers: int, time_scale: float,
             cache_tokens: int | None = None) -> Iterator[str]:
    """OpenAI's API, played by a promptbatch with ``simulated`` behind ``gpt-4o-mini``
    and no result cache; yields its base URL (``.../v1``)."""
    folder = run_dir / "upstream"
    folder.mkdir(parents=True)
    with EmbeddedRedis(folder / "redis") as server:
        port = free_port()
        env = _env({"PROMPTBATCH_REDIS_URL": server.url,
                    "PROMPTBATCH_DATABASE_URL": f"sqlite:///{folder / 'jobs.db'}",
                    "PROMPTBATCH_DATA_DIR": str(folder / "data"),
                    "PROMPTBATCH_API_KEYS": json.dumps({KEY: "bench"}),
                    "PROMPTBATCH_MODEL_ALIASES": json.dumps({MODEL: "simulated|sim-1"}),
                    "PROMPTBATCH_CACHE_ENABLED": "false",
                    "PROMPTBATCH_MAX_WAIT_MS": "[0,0,0,0,20]",
                    "PROMPTBATCH_SIMULATED_TIME_SCALE": str(time_scale)})
        if cache_tokens is not None:
            env["PROMPTBATCH_SIMULATED_CACHE_TOKENS"] = str(cache_tokens)
        migrated(settings_of(env))
        kids = Children(folder)
        try:
            kids.start("scheduler", promptbatch_argv("scheduler"), env)
            kids.start("worker", promptbatch_argv("worker", "--concurrency", str(workers),
                                                  "--loglevel", "warning"), env)
            kids.start("api", promptbatch_argv("api", "--port", str(port)), env)
            wait_for_workers(server.url, workers)
            url = f"http://127.0.0.1:{port}"
            _wait_http(f"{url}/readyz")
            yield f"{url}/v1"
        finally:
            kids.stop()


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def price_entry() -> dict[str, float]:
    """``PROMPTBATCH_PRICES``' entry for our deployment: what the price book gives
    ``simulated`` (OpenAI's gpt-4o-mini)."""
    price = PriceBook().price("simulated", "sim-1")
    if price is None:
        raise SystemExit("the price library has no price for "
                         f"{'|'.join(SIMULATED_PRICED_AS)}: nothing to measure")
    r = price.rates
    return {"input": r.input, "cached_input": r.cached_input, "cache_write": r.cache_write,
            "output": r.output, "batch_discount": price.batch_discount}


# --- one run --------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What the system recorded of one run."""

    label: str
    wall_s: float
    results: list[JobResult]
    sql_cost: float = 0.0
    sql_saved: dict[str, float] = field(default_factory=dict)
    metric_cost: float = 0.0
    metric_saved: dict[str, float] = field(default_factory=dict)

    @property
    def result_cost(self) -> float:
        return sum((r.usage.cost_usd or 0.0) for r in self.results if r.usage)

    @property
    def answered(self) -> Counter[str]:
        return Counter(r.cache or "own call" for r in self.results)

    @property
    def cached_share(self) -> float:
        own = [r.usage for r in self.results if r.usage and r.cache is None]
        prompt = sum(u.prompt_tokens for u in own)
        return sum(u.cached_tokens for u in own) / prompt if prompt else 0.0

    @property
    def lane_jobs(self) -> int:
        return sum(r.lane == "provider_batch" for r in self.results)


def our_env(redis_url: str, db: Path, data_dir: Path, cache: bool, lane: bool,
            upstream_url: str | None, time_scale: float) -> dict[str, str]:
    """Our processes' environment: ``upstream_url`` (the second promptbatch) serves
    ``openai|gpt-4o-mini``, priced as ``simulated`` is; the lane on for it, or not."""
    env = {"PROMPTBATCH_REDIS_URL": redis_url, "PROMPTBATCH_DATABASE_URL": f"sqlite:///{db}",
           "PROMPTBATCH_DATA_DIR": str(data_dir),
           "PROMPTBATCH_CACHE_ENABLED": "true" if cache else "false",
           "PROMPTBATCH_SIMULATED_TIME_SCALE": str(time_scale)}
    if upstream_url is not None:
        env.update({"PROMPTBATCH_OPENAI_BASE_URL": upstream_url,
                    "PROMPTBATCH_OPENAI_API_KEY": KEY,
                    "PROMPTBATCH_OPENAI_PREFIX_STRATEGY": "parallel",
                    "PROMPTBATCH_PRICES": json.dumps({DEPLOYMENT: price_entry()}),
                    "PROMPTBATCH_BATCH_API_POLL_MIN_S": "1",
                    "PROMPTBATCH_BATCH_API_POLL_MAX_S": "5"})
    if lane:
        env["PROMPTBATCH_BATCH_API"] = json.dumps({DEPLOYMENT: True})
    return _env(env)


def run(label: str, cache: bool, lane: bool, batches: bool, jobs: list[dict[str, Any]],
        args: argparse.Namespace, run_dir: Path) -> Outcome:
    """One run (through a fresh second promptbatch for the lane, or with
    ``--fast-via-upstream``); what the system recorded of it."""
    via = lane or args.fast_via_upstream
    provider, model = ("openai", MODEL) if via else SIMULATED
    jobs = [{**j, "provider": provider, "model": model} for j in jobs]
    with contextlib.ExitStack() as stack:
        url = (stack.enter_context(upstream(run_dir, args.workers, args.time_scale,
                                            args.server_cache_tokens)) if via else None)
        server = stack.enter_context(EmbeddedRedis(run_dir / "redis"))
        env = our_env(server.url, run_dir / "jobs.db", run_dir / "data", cache, lane, url,
                      args.time_scale)
        if args.lane_wait_s is not None:
            env["PROMPTBATCH_BATCH_API_WAIT_S"] = str(args.lane_wait_s)
        if args.server_cache_tokens is not None:
            env["PROMPTBATCH_SIMULATED_CACHE_TOKENS"] = str(args.server_cache_tokens)
        s = migrated(settings_of(env))
        kids = Children(run_dir)
        metrics_port = free_port()
        scheduler = promptbatch_argv("scheduler", "--metrics-port", str(metrics_port))
        try:
            kids.start("worker", promptbatch_argv("worker", "--concurrency", str(args.workers),
                                                  "--loglevel", "warning"), env)
            wait_for_workers(s.redis_url, args.workers)
            if batches:
                kids.start("scheduler", scheduler, env)
            with Client(s) as client:
                t0 = time.perf_counter()
                ids: list[str] = []
                for start in range(0, len(jobs), CHUNK):
                    ids += client.submit_many(jobs[start:start + CHUNK])
                if not batches:
                    send_baseline(client, s, ids, 1, deployment=f"{provider}|{model}",
                                  cls=BULK)
                results = list(client.results(ids, timeout=args.timeout))
                wall = time.perf_counter() - t0
            if not batches:  # the scheduler exports the counters
                kids.start("scheduler", scheduler, env)
            out = Outcome(label, wall, results)
            recorded(out, s, metrics_port)
            return out
        finally:
            kids.stop()


def recorded(out: Outcome, s: Settings, metrics_port: int) -> None:
    """Fill ``out`` from the SQL rows and the scheduler's counters, waited for until they
    hold what SQL holds (the scheduler reads the counters once a tick: its last read may
    predate the last results)."""
    store = JobStore(s.database_url)
    try:
        (total,) = ledger.totals(store.engine, by="deployment")
    finally:
        store.close()
    out.sql_cost, out.sql_saved = total.cost_usd, total.saved_usd
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError):
            out.metric_cost, out.metric_saved = scrape(metrics_port)
            if disagreement(out) is None:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{out.label}: the scheduler's counters never matched the SQL "
                               f"rows: {disagreement(out)}")
        time.sleep(0.5)


def disagreement(out: Outcome) -> str | None:
    """Where the counters and the SQL rows of a run differ (None: nowhere)."""
    pairs = [("spent", out.metric_cost, out.sql_cost)]
    pairs += [(f"saved by {r}", out.metric_saved.get(r, 0.0), out.sql_saved.get(r, 0.0))
              for r in REASONS]
    for name, metric, sql in pairs:
        if not math.isclose(metric, sql, rel_tol=1e-6, abs_tol=1e-9):
            return f"{name}: metrics {metric}, SQL {sql}"
    return None


def scrape(port: int) -> tuple[float, dict[str, float]]:
    """promptbatch_spend_usd_total summed, and promptbatch_saved_usd_total by reason."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    spend = 0.0
    saved: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "promptbatch_spend_usd_total":
                spend += sample.value
            elif sample.name == "promptbatch_saved_usd_total":
                reason = sample.labels["reason"]
                saved[reason] = saved.get(reason, 0.0) + sample.value
    return spend, saved


# --- the report -----------------------------------------------------------------------------

def check(out: Outcome, n: int) -> None:
    """Every job succeeded, and the three records of money agree."""
    states = Counter(r.state for r in out.results)
    if states != {JobState.SUCCEEDED: n}:
        raise RuntimeError(f"{out.label}: not every job succeeded: {dict(states)}")
    if not math.isclose(out.result_cost, out.sql_cost, rel_tol=1e-6, abs_tol=1e-9):
        raise RuntimeError(f"{out.label}: the results' usage.cost_usd sum to "
                           f"{out.result_cost}, the SQL rows to {out.sql_cost}")
    if (why := disagreement(out)) is not None:
        raise RuntimeError(f"{out.label}: {why}")


def report(outs: list[Outcome], args: argparse.Namespace) -> None:
    base = outs[0].sql_cost
    n = args.jobs
    rows = []
    for o in outs:
        a = o.answered
        rows.append((o.label, f"{o.wall_s:.0f}", a["own call"], o.lane_jobs, a["exact"],
                     a["coalesced"], f"{100 * o.cached_share:.0f}%", f"${o.sql_cost:.4f}",
                     f"${1000 * o.sql_cost / n:.4f}", f"{base / o.sql_cost:.2f}x"))
    p = price_entry()
    print(f"prices: {'|'.join(SIMULATED)} is priced as {'|'.join(SIMULATED_PRICED_AS)} "
          f"(${p['input']} input, ${p['cached_input']} cached input, ${p['output']} output "
          f"per million tokens, batch discount {p['batch_discount']}); {DEPLOYMENT} (the lane's "
          "deployment: a second promptbatch with simulated behind it) the same")
    table(f"cost: {n:,} bulk jobs over {args.families} prefix families, "
          f"{100 * args.repeats:.0f}% exact repeats",
          ["run", "seconds", "own calls", "via the lane", "exact cache", "coalesced",
           "tokens cached", "cost (SQL)", "per 1k jobs", "baseline / this"], rows)
    saved_rows = []
    for reason in REASONS:
        values = [o.metric_saved.get(reason, 0.0) for o in outs]
        if any(values):
            saved_rows.append((reason, *(f"${v:.4f} ({100 * v / base:.0f}%)" for v in values)))
    saved_rows.append(("cost", *(f"${o.metric_cost:.4f} ({100 * o.metric_cost / base:.0f}%)"
                                 for o in outs)))
    table("saved by reason, promptbatch_saved_usd_total (share of the baseline's cost)",
          ["reason", *(o.label for o in outs)], saved_rows)
    best = outs[-1]
    print(f"promptbatch cost ${best.sql_cost:.4f} for {n:,} jobs against ${base:.4f} for one "
          f"request per prompt: {base / best.sql_cost:.2f}x cheaper "
          f"(fast path only: {base / outs[1].sql_cost:.2f}x). SQL spend rows, the results' "
          "usage.cost_usd and the Prometheus counters agree in every run.")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--families", type=int, default=40)
    parser.add_argument("--repeats", type=float, default=0.1,
                        help="share of the jobs that repeat an earlier one exactly")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes of ours, and of the provider's")
    parser.add_argument("--time-scale", type=float, default=0.01,
                        help="simulated's time scale (its modelled durations times this)")
    parser.add_argument("--lane-wait-s", type=float, default=None,
                        help="PROMPTBATCH_BATCH_API_WAIT_S (default: the product's, the bulk "
                        "class's longest wait, 30 s)")
    parser.add_argument("--server-cache-tokens", type=int, default=None,
                        help="simulated's prefix cache per worker process, in tokens "
                        "(default: its own, 200,000, which holds every family; smaller, the "
                        "order of the requests decides what it holds)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds a run may wait for its results")
    parser.add_argument("--fast-via-upstream", action="store_true",
                        help="run the runs without the lane through the second promptbatch "
                        "too (openai|gpt-4o-mini), not on simulated in our workers")
    parser.add_argument("--keep", action="store_true", help="keep logs and data")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, tmp: Path) -> list[Outcome]:
    """Every run, checked (each job succeeded; SQL, results and metrics agree)."""
    jobs = workload(args.jobs, args.families, args.repeats)
    outs = []
    for k, (label, cache, lane, batches) in enumerate(RUNS):
        out = run(label, cache, lane, batches, jobs, args, tmp / str(k))
        check(out, args.jobs)
        print(f"{label}: {out.wall_s:.0f} s, ${out.sql_cost:.4f}", flush=True)
        outs.append(out)
    return outs


def main() -> None:
    args = parse()
    tmp = Path(tempfile.mkdtemp(prefix="pb-cost-"))
    try:
        report(measure(args, tmp), args)
    finally:
        if args.keep:
            print(f"logs and data in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Routing batches over the replicas of one deployment: round-robin, least-outstanding and
promptbatch's cache-aware router (``scheduler/routing.py``), in one command.

    make bench-routing        # installs the held-out workload's data, runs everything
    .venv/bin/python bench/routing.py [--replicas 4] [--runs 3]

A discrete-event simulation in virtual time. Each replica is the ``simulated`` provider's
cost model (``workers/providers/simulated.py``) with a prefix cache of its own
(``--cache-tokens``, LRU) and ``--slots`` calls at once. The jobs are all pending at the
start and cut into batches as the scheduler packs them: each prefix family (one template)
whole, in batches of at most ``--batch`` jobs, in the order the families fill them. A
dispatcher keeps two batches per slot in flight (the scheduler's room) and sends each
batch where the policy says; a replica runs what it was given in order. The router is
the scheduler's own code, with the scheduler's size-based service-time estimate (it
knows nothing of the caches); round-robin is what a plain load balancer does;
least-outstanding sends each batch to the replica with the fewest batches in flight.

Workloads:

* **working set**: 32 customer templates of about 1,600 tokens, questions from MT-Bench
  behind them (uniformly), batches of 8: the templates' working set (51,000 tokens) is
  over one replica's cache (24,000) and under the sum of four (96,000), with room for the
  questions that pass through each cache.
* **held out**: the policy benchmark's held-out workload (4,000 ShareGPT questions behind
  MT-Bench's judge prompts, Zipf, 15% bare), which no rule was tuned on.
* **one template**: every job behind one template: affinity must not pile everything
  onto one replica.

Reported per policy: jobs/s, prompt tokens computed (not served from a cache), and
max/mean busy time over the replicas.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table
from bench.workload import (
    PrefixJob,
    customer_system_prompt,
    mtbench_questions,
    sharegpt_behind_judges,
)
from jobs.models import GenerationParams
from scheduler.pool import FAMILY_LEVEL, PREFIX_LEVELS, prefix_signature
from scheduler.routing import ReplicaSpec, Router, RoutingRules
from scheduler.service_time import ServiceModel
from workers.providers.base import ProviderRequest
from workers.providers.simulated import CHARS_PER_TOKEN, CostModel, SimulatedProvider

KEY = "simulated|sim-1|x"


@dataclass
class Batch:
    id: str
    texts: list[str]
    max_tokens: int
    family: int | None
    prefix_tokens: int


@dataclass
class Outcome:
    seconds: float
    computed_tokens: int
    busy: list[float] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        return max(self.busy) / statistics.mean(self.busy) if any(self.busy) else 1.0


def long_template(i: int) -> str:
    """A customer template of about 1,600 tokens (two of the benchmark's customer
    prompts' rules, for one customer)."""
    base = customer_system_prompt(i)
    return f"{base} Escalation guide: {base.split('. ', 1)[1]}"


def working_set_jobs(n: int, templates: int, seed: int = 11) -> list[PrefixJob]:
    from bench.workload import Job

    questions = mtbench_questions()
    systems = [long_template(i) for i in range(templates)]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        system = rng.choice(systems)
        q = rng.choice(questions)
        out.append(PrefixJob(Job(text=f"{system}\n\n{q}", priority=2, deadline_s=None,
                                 max_tokens=32, tenant="t", service="ws"), system))
    return out


def one_template_jobs(n: int, seed: int = 13) -> list[PrefixJob]:
    from bench.workload import Job

    questions = mtbench_questions()
    system = long_template(0)
    rng = random.Random(seed)
    return [PrefixJob(Job(text=f"{system}\n\n{rng.choice(questions)}", priority=2,
                          deadline_s=None, max_tokens=32, tenant="t", service="one"), system)
            for _ in range(n)]


def batches_of(jobs: Sequence[PrefixJob], size: int) -> list[Batch]:
    """Families packed whole, in batches of at most ``size``, in the order they fill."""
    buffers: dict[int | None, list[PrefixJob]] = {}
    out: list[Batch] = []

    def emit(family: int | None, group: list[PrefixJob]) -> None:
        shared = len(group[0].system) // CHARS_PER_TOKEN if family is not None else 0
        out.append(Batch(f"b{len(out)}", [j.job.text for j in group],
                         group[0].job.max_tokens, family, shared))

    for j in jobs:
        sig = prefix_signature(j.job.text)
        family = sig[FAMILY_LEVEL] if len(sig) > FAMILY_LEVEL and len(j.system) >= PREFIX_LEVELS[
            FAMILY_LEVEL] else None
        buf = buffers.setdefault(family, [])
        buf.append(j)
        if len(buf) == size:
            emit(family, buf)
            buffers[family] = []
    for family, buf in buffers.items():
        if buf:
            emit(family, buf)
    return out


Policy = Callable[[Batch, list[int], float], int]


def simulate(batches: Sequence[Batch], replicas: int, slots: int, cache_tokens: int,
             policy: str) -> Outcome:
    servers = [SimulatedProvider(CostModel(cache_tokens=cache_tokens, time_scale=0.0))
               for _ in range(replicas)]
    service = ServiceModel()
    router = Router([ReplicaSpec(f"r{i}", cache_tokens=cache_tokens) for i in range(replicas)],
                    RoutingRules())
    outstanding = [0] * replicas
    queues: list[list[tuple[Batch, float]]] = [[] for _ in range(replicas)]
    running = [0] * replicas
    busy = [0.0] * replicas
    rr = itertools.count()
    events: list[tuple[float, int, int, Batch, float]] = []  # (end, seq, replica, batch, s)
    seq = itertools.count()
    now = 0.0
    computed = 0
    pending = list(batches)
    pending.reverse()
    room = 2 * slots * replicas
    inflight = 0

    def route(b: Batch) -> int:
        if policy == "round-robin":
            return next(rr) % replicas
        if policy == "least-outstanding":
            low = min(outstanding)
            ties = [i for i in range(replicas) if outstanding[i] == low]
            return ties[next(rr) % len(ties)]
        est = service.estimate(KEY, len(b.texts))
        choice = router.choose(b.family, b.prefix_tokens, est)
        router.sent(b.id, choice, b.family, b.prefix_tokens, est, now,
                    sum(len(t) // CHARS_PER_TOKEN + 1 - b.prefix_tokens for t in b.texts))
        return choice.replica

    def start(i: int) -> None:
        nonlocal computed
        while running[i] < slots and queues[i]:
            b, _ = queues[i].pop(0)
            reqs = [ProviderRequest(job_id=f"{b.id}-{k}", model="sim-1",
                                    params=GenerationParams(max_tokens=b.max_tokens),
                                    prompt=t, messages=None, deadline=None, text=t)
                    for k, t in enumerate(b.texts)]
            seconds, usages = servers[i].cost(reqs)
            computed += sum(u.prompt_tokens - (u.cached_tokens or 0) for u in usages)
            running[i] += 1
            busy[i] += seconds
            heapq.heappush(events, (now + seconds, next(seq), i, b, seconds))

    while pending or events:
        while pending and inflight < room:
            b = pending.pop()
            i = route(b)
            outstanding[i] += 1
            inflight += 1
            queues[i].append((b, now))
            start(i)
        now, _, i, b, seconds = heapq.heappop(events)
        running[i] -= 1
        outstanding[i] -= 1
        inflight -= 1
        service.observe("simulated|sim-1", len(b.texts), seconds)
        router.done(b.id, seconds)
        start(i)
    return Outcome(now, computed, busy)


POLICIES = ("round-robin", "least-outstanding", "promptbatch")


def run_case(name: str, jobs: Sequence[PrefixJob], args: argparse.Namespace, batch: int,
             cache_tokens: int) -> dict[str, Outcome]:
    batches = batches_of(jobs, batch)
    results = {p: simulate(batches, args.replicas, args.slots, cache_tokens, p)
               for p in POLICIES}
    rows = []
    base = results["round-robin"]
    lo = results["least-outstanding"]
    for p in POLICIES:
        o = results[p]
        rows.append([p, f"{len(jobs) / o.seconds:,.1f}", f"{o.computed_tokens:,}",
                     f"{o.imbalance:.2f}", f"{base.seconds / o.seconds:.2f}x",
                     f"{lo.seconds / o.seconds:.2f}x"])
    table(f"{name}: {len(jobs):,} jobs in {len(batches):,} batches, {args.replicas} replicas "
          f"of {args.slots} slots, {cache_tokens:,}-token caches",
          ["policy", "jobs/s", "prompt tokens computed", "max/mean load", "vs round-robin",
           "vs least-outstanding"], rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--templates", type=int, default=32)
    parser.add_argument("--cache-tokens", type=int, default=24_000)
    args = parser.parse_args()
    ws = run_case("working set", working_set_jobs(args.jobs, args.templates), args, 8,
                  args.cache_tokens)
    held = run_case("held out", sharegpt_behind_judges(args.jobs), args, 32, args.cache_tokens)
    one = run_case("one template", one_template_jobs(args.jobs), args, 8, args.cache_tokens)
    pb, rr = ws["promptbatch"], ws["round-robin"]
    checks = [
        ("working set: jobs/s vs round-robin >= 1.5", rr.seconds / pb.seconds, 1.5, True),
        ("working set: max/mean replica load <= 1.3", pb.imbalance, 1.3, False),
        ("held out: max/mean replica load <= 1.3", held["promptbatch"].imbalance, 1.3, False),
        ("one template: jobs/s vs least-outstanding >= 0.95",
         one["least-outstanding"].seconds / one["promptbatch"].seconds, 0.95, True),
    ]
    rows = [[what, f"{value:.2f}", "met" if (value >= bound if higher else value <= bound)
             else "NOT MET"] for what, value, bound, higher in checks]
    table("Targets", ["target", "measured", ""], rows)


if __name__ == "__main__":
    main()

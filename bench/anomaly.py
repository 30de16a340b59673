"""Anomaly detection and its actions, replayed on simulated replicas with seeds.

    make bench-anomaly
    .venv/bin/python bench/anomaly.py [--seeds 3] [--steady-hours 1]

A discrete-event simulation in virtual time. Jobs arrive (Poisson, seeded); ``--slots``
worker slots each run one batch at a time, formed as the scheduler would when a slot is
free (up to 8 jobs, earliest deadline first, at once: work-conserving). A batch's time is
the ``simulated`` provider's shape (40 ms + 12 ms a job), with +-30% jitter and one call
in 50 five times slower. The scheduler's own code decides and acts: ``Routing`` routes
each batch over two replicas, ``scheduler.monitor.Monitor`` (on an embedded Valkey)
learns the baselines, raises and clears anomalies from each batch's end event, sets the
``avoid`` key and the slowed replicas, and raises the desired slots; the workers' retry
layer (``ProviderCaller._pick``) reads ``avoid``. Scenarios (each from the same seed with
the actions on and off, ``anomaly_actions_off``):

* **slow replica**: replica B five times slower from 120 s to 300 s, jobs at 90% of the
  healthy capacity, deadlines 30 s after arrival;
* **errors 30%**: the deployment's requests fail at 30% from 120 s to 300 s (retried with
  backoff up to four calls a job), with a fallback deployment;
* **cache collapse**: the prefix cache serves 10% of prompt tokens instead of 75%, from
  120 s to 300 s;
* **deadline backlog**: 2 slots, half busy with arrivals due in 60 s; at 60 s a burst of
  9,000 jobs due 40 s to 100 s later, which 2 slots cannot meet; **autoscaled**: 9,000
  jobs all due 45 s later (one deadline for the lot, as a nightly job has), with an
  autoscaler that looks at the desired slots every 15 s and whose new slots join 20 s
  later (KEDA's polling and a worker's start), never scaling down;
* **steady**: ``--steady-hours`` of the noisy traffic alone on two replicas, per seed:
  every anomaly raised is a false alarm.

Reported per detector kind: time to detect (from the fault's start), time to clear (from
its end; for deadline_risk, the first miss after it was raised), false alarms per hour of
steady traffic; per scenario with the actions on and off: jobs/s during the fault (jobs
that succeeded), deadline misses (jobs finished late, failed or expired) and the most
desired slots the scaling signal asked for.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench.common import table
from config.settings import Settings
from jobs.models import GenerationParams, Usage
from promptbatch.embedded import EmbeddedRedis
from scheduler.monitor import Monitor
from scheduler.pool import PendingJob, prefix_signature
from scheduler.routing import Routing
from scheduler.scaling import ClassDemand, deadline_risks, desired_slots
from workers.providers.base import ProviderReply, ProviderRequest
from workers.retry import Health, ProviderCaller

DEP, SPARE = "openai|sim-1", "openai|sim-spare"
REPLICAS = "http://10.0.0.1:8000/v1,http://10.0.0.2:8000/v1"
BATCH = 8
FAULT = (120.0, 300.0)


def batch_seconds(size: int, rng: random.Random) -> float:
    """One call of ``size`` jobs, with the noise of a real server."""
    slow = 5.0 if rng.random() < 0.02 else 1.0
    return (0.04 + 0.012 * size) * rng.uniform(0.7, 1.3) * slow


#: Seconds of one slot per job at a full batch (the capacity model).
JOB_S = (0.04 + 0.012 * BATCH) / BATCH


@dataclass
class Job:
    arrived: float
    deadline: float | None


@dataclass
class Run:
    """What one run measured."""

    raised: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    cleared: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    done_in_fault: int = 0
    misses: int = 0
    first_miss: float | None = None
    finished: int = 0
    max_desired: int = 0


@dataclass
class Scenario:
    name: str
    until: float
    rate: float  # jobs per second arriving
    deadline_s: float | None = 30.0
    slots: int = 4
    replicas: bool = True
    replica_factor: Callable[[float, int], float] = lambda t, i: 1.0
    error_share: Callable[[float, str], float] = lambda t, d: 0.0
    cached: Callable[[float], float] = lambda t: 0.75
    burst: tuple[float, int, float, float] | None = None  # at, jobs, due from, due to
    autoscale: bool = False
    fault: tuple[float, float] = FAULT


class Sim:
    """One run of a scenario (see the module)."""

    def __init__(self, sc: Scenario, r: redis.Redis, seed: int, actions: bool) -> None:
        self.sc = sc
        self.rng = random.Random(seed)
        extra: dict[str, Any] = {"anomaly_actions_off": [] if actions else [
            "latency_high", "throughput_low", "errors_high", "deadline_risk"]}
        if sc.replicas:
            extra["openai_base_url"] = REPLICAS
        self.settings = Settings(_env_file=None, fallbacks={DEP: [SPARE]},  # type: ignore[call-arg]
                                 provider_retry_base_s=0.5, **extra)
        r.flushall()
        self.r = r
        self.routing = Routing(self.settings)
        self.monitor = Monitor(r, self.settings, self.routing)
        self.monitor.load(0.0)
        self.clock = 0.0
        members = [_Server(self, i) for i in range(2 if sc.replicas else 1)]
        provider = _Server(self, 0)
        if sc.replicas:
            provider.members = members  # type: ignore[attr-defined]
            provider.urls = REPLICAS.split(",")  # type: ignore[attr-defined]
        self.caller = ProviderCaller(self.settings, lambda name: provider,  # type: ignore[arg-type,return-value]
                                     health=Health(r, self.settings), clock=lambda: self.clock,
                                     sleep=self._sleep, rng=random.Random(seed + 1))
        self.pending: list[tuple[float, int, Job]] = []
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.slots = sc.slots
        self.joining = 0
        self.busy = 0
        self.run = Run()
        self.arrivals: list[float] = []

    def _sleep(self, seconds: float) -> None:
        self.clock += seconds

    def push(self, at: float, kind: str, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, data))

    def add(self, job: Job) -> None:
        self.seq += 1
        key = job.deadline if job.deadline is not None else job.arrived + 1e6
        heapq.heappush(self.pending, (key, self.seq, job))

    def go(self) -> Run:
        sc = self.sc
        self.push(self.rng.expovariate(sc.rate), "arrive")
        self.push(1.0, "tick")
        if sc.burst:
            self.push(sc.burst[0], "burst")
        while self.events:
            t, _, kind, data = heapq.heappop(self.events)
            if t > sc.until:
                break
            getattr(self, f"_{kind}")(t, data)
            self._dispatch(t)
        return self.run

    # --- events -------------------------------------------------------------------------

    def _arrive(self, t: float, _: Any) -> None:
        self.add(Job(t, t + self.sc.deadline_s if self.sc.deadline_s else None))
        self.arrivals.append(t)
        self.push(t + self.rng.expovariate(self.sc.rate), "arrive")

    def _burst(self, t: float, _: Any) -> None:
        assert self.sc.burst is not None
        _, n, lo, hi = self.sc.burst
        for i in range(n):
            self.add(Job(t, t + lo + (hi - lo) * i / n))

    def _join(self, t: float, n: int) -> None:
        self.slots += n
        self.joining -= n

    def _tick(self, t: float, _: Any) -> None:
        self._expire(t)
        if self.sc.burst:
            desired = self._desired(t)
            self.run.max_desired = max(self.run.max_desired, desired)
            more = desired - self.slots - self.joining
            if self.sc.autoscale and round(t) % 15 == 0 and more > 0:
                self.joining += more
                self.push(t + 20.0, "join", more)
        for change in self.monitor.step(t):
            a = json.loads(change.anomaly.dump())
            (self.run.raised if change.raised else self.run.cleared).append((t, a))
        self.push(t + 1.0, "tick")

    def _done(self, t: float, data: tuple[list[Job], dict[str, str], str, int]) -> None:
        jobs, fields, batch_id, ok = data
        self.busy -= 1
        lo, hi = self.sc.fault
        for job in jobs[:ok]:
            self._count(t, job.deadline is not None and t > job.deadline)
            if lo <= t < hi:
                self.run.done_in_fault += 1
        for _ in jobs[ok:]:  # failed jobs: not done in time
            self._count(t, True)
        self.monitor.on_event(fields, t)
        if self.sc.replicas:
            self.routing.done(batch_id, float(fields["seconds"]),
                              int(fields["replica"]) if "replica" in fields else None)

    def _count(self, t: float, missed: bool) -> None:
        self.run.finished += 1
        if missed:
            self.run.misses += 1
            if self.run.first_miss is None:
                self.run.first_miss = t

    # --- what the scheduler and the workers do ------------------------------------------

    def _expire(self, t: float) -> None:
        while self.pending and self.pending[0][2].deadline is not None \
                and self.pending[0][2].deadline < t:
            heapq.heappop(self.pending)
            self._count(t, True)

    def _dispatch(self, t: float) -> None:
        while self.busy < self.slots and self.pending:
            jobs = [heapq.heappop(self.pending)[2] for _ in range(min(BATCH, len(self.pending)))]
            self.busy += 1
            self.seq += 1
            batch_id = f"b{self.seq}"
            replica = None
            if self.sc.replicas:
                pend = [PendingJob(id=f"{batch_id}-{i}", key=f"{DEP}|x", priority=2,
                                   tenant="t", created_at=j.arrived, deadline=j.deadline,
                                   tokens=100, prefix=prefix_signature("template " * 40))
                        for i, j in enumerate(jobs)]
                order = self.routing.route(batch_id, pend, 256, 0.04 + 0.012 * len(jobs),
                                           DEP, t)
                replica = order[0] if order else None
            seconds, fields, ok = self._call(t, jobs, replica)
            fields.update({"done": batch_id, "deployment": DEP, "size": str(len(jobs)),
                           "seconds": str(round(seconds, 6))})
            self.push(t + seconds, "done", (jobs, fields, batch_id, ok))

    def _call(self, t: float, jobs: list[Job], replica: int | None,
              ) -> tuple[float, dict[str, str], int]:
        """The batch's calls through the workers' retry layer (retries, backoff, the
        fallbacks, ``avoid``) in virtual time; its time, its end event's fields (as a
        worker sends them) and how many jobs succeeded."""
        self.clock = t
        requests = [ProviderRequest(job_id=str(i), model=DEP.split("|")[1],
                                    params=GenerationParams(), prompt="q", messages=None,
                                    deadline=None, text="q") for i in range(len(jobs))]
        outcomes = self.caller.call(requests, "openai", replicas=(
            None if replica is None else [replica, 1 - replica]))
        usage = [o.reply.usage for o in outcomes.values() if o.reply.ok and o.reply.usage]
        fields = {"completion_tokens": str(sum(u.completion_tokens for u in usage)),
                  "prompt_tokens": str(sum(u.prompt_tokens for u in usage)),
                  "cached_tokens": str(sum(u.cached_tokens for u in usage)),
                  "calls": json.dumps([[d, i, n, e] for (d, i), (n, e)
                                       in self.caller.calls.items()])}
        if self.caller.answered not in (None, DEP):
            fields["ran_on"] = str(self.caller.answered)
        if self.caller.replica is not None:
            fields["replica"] = str(self.caller.replica)
        return self.clock - t, fields, len(usage)

    def _complete(self, index: int, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        """One call to replica ``index`` (or the one address) in virtual time."""
        sc, rng = self.sc, self.rng
        dep = f"openai|{requests[0].model}"
        factor = sc.replica_factor(self.clock, index) if dep == DEP else 1.0
        self.clock += batch_seconds(len(requests), rng) * factor
        share = sc.error_share(self.clock, dep)
        cached = sc.cached(self.clock) * rng.uniform(0.9, 1.0)
        return [ProviderReply(job_id=q.job_id, transient=True, error="http 500: injected")
                if rng.random() < share else
                ProviderReply(job_id=q.job_id, text="a", usage=Usage(
                    prompt_tokens=400, completion_tokens=32, cached_tokens=int(400 * cached)))
                for q in requests]

    def _desired(self, t: float) -> int:
        """The scheduler's scaling signal, with deadline_risk's action."""
        jobs = sorted(j for j in self.pending)
        deadlines = [(j.deadline - t, JOB_S) for _, _, j in jobs if j.deadline is not None]
        work = len(jobs) * JOB_S
        recent = [a for a in self.arrivals[-2000:] if a >= t - 60]
        demands = [ClassDemand(), ClassDemand(),
                   ClassDemand(pending=len(jobs), work_s=work, batches=-(-len(jobs) // BATCH),
                               inflight=self.busy,
                               slack_s=deadlines[0][0] if deadlines else None,
                               arriving_s=len(recent) / 60 * JOB_S),
                   ClassDemand(), ClassDemand()]
        batch_s = JOB_S * BATCH
        scale = desired_slots(demands, horizon_s=300.0, batch_s=batch_s)
        risks = deadline_risks([d.work_s for d in demands], [[], [], deadlines, [], []],
                               slots=self.slots, batch_s=batch_s, inflight=self.busy,
                               keep_up=scale.keep_up)
        self.monitor.on_deadlines(risks, t)
        return self.monitor.desired(scale.desired, scale.reason, risks, None, scale.keep_up)[0]


class _Server:
    """A simulated server as the retry layer sees a provider (or one replica of it)."""

    name = "openai"
    probe_first = False
    streams = False
    sink = None

    def __init__(self, sim: Sim, index: int) -> None:
        self.sim = sim
        self.index = index

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        return self.sim._complete(self.index, requests)

    def close(self) -> None:
        return None


def capacity(slots: int) -> float:
    """Jobs per second ``slots`` slots run at full batches."""
    return slots / JOB_S


def scenarios() -> list[Scenario]:
    lo, hi = FAULT
    return [
        Scenario("slow replica", 420.0, 0.9 * capacity(2), slots=2,
                 replica_factor=lambda t, i: 5.0 if i == 1 and lo <= t < hi else 1.0),
        Scenario("slow replica, 4 slots", 420.0, 0.9 * capacity(4),
                 replica_factor=lambda t, i: 5.0 if i == 1 and lo <= t < hi else 1.0),
        Scenario("errors 30%", 420.0, 0.7 * capacity(4), replicas=False,
                 error_share=lambda t, d: 0.3 if d == DEP and lo <= t < hi else 0.005),
        Scenario("cache collapse", 420.0, 0.7 * capacity(4),
                 cached=lambda t: 0.1 if lo <= t < hi else 0.75),
        Scenario("deadline backlog", 300.0, 0.5 * capacity(2), slots=2, replicas=False,
                 deadline_s=60.0, burst=(60.0, 9000, 40.0, 100.0), fault=(60.0, 160.0)),
        Scenario("deadline backlog, autoscaled", 300.0, 0.5 * capacity(2), slots=2,
                 replicas=False, deadline_s=60.0, burst=(60.0, 9000, 45.0, 45.0),
                 autoscale=True, fault=(60.0, 160.0)),
    ]


KINDS = {"slow replica": ("latency_high", "throughput_low"),
         "slow replica, 4 slots": ("latency_high", "throughput_low"),
         "errors 30%": ("errors_high",),
         "cache collapse": ("cache_hit_low",), "deadline backlog": ("deadline_risk",),
         "deadline backlog, autoscaled": ("deadline_risk",)}


def first(events: list[tuple[float, dict[str, Any]]], kind: str, after: float) -> float | None:
    found = [t for t, a in events if a["kind"] == kind and t >= after]
    return min(found) - after if found else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steady-hours", type=float, default=1.0)
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the monitor logs each raise and clear
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        detect_rows: list[list[object]] = []
        action_rows: list[list[object]] = []
        for sc in scenarios():
            per: dict[bool, list[Run]] = {True: [], False: []}
            for seed in range(args.seeds):
                for actions in (True, False):
                    per[actions].append(Sim(sc, r, seed, actions).go())
            lo, hi = sc.fault
            for kind in KINDS[sc.name]:
                det = [first(x.raised, kind, lo) for x in per[True]]
                if kind == "deadline_risk":  # the lead it gave before the first miss
                    clr = [None if x.first_miss is None or d is None else
                           x.first_miss - lo - d for x, d in zip(per[True], det, strict=True)]
                else:
                    clr = [first(x.cleared, kind, hi) for x in per[True]]
                detect_rows.append([kind, sc.name, _range(det), _range(
                    clr, "no miss" if kind == "deadline_risk" else "not cleared")])
            for actions in (True, False):
                runs = per[actions]
                rate = statistics.mean(x.done_in_fault / (hi - lo) for x in runs)
                misses = statistics.mean(x.misses for x in runs)
                action_rows.append([sc.name, "on" if actions else "off", round(rate, 1),
                                    round(misses, 1), max(x.max_desired for x in runs) or "-"])
            on = statistics.mean(x.done_in_fault for x in per[True])
            off = statistics.mean(x.done_in_fault for x in per[False])
            action_rows[-2].append(f"{on / off:.2f}x" if off else "-")
            action_rows[-1].append("1.00x")
        steady = Scenario("steady", 3600.0 * args.steady_hours, 0.8 * capacity(4))
        alarms: dict[str, int] = {}
        for seed in range(args.seeds):
            for _, a in Sim(steady, r, 100 + seed, True).go().raised:
                alarms[a["kind"]] = alarms.get(a["kind"], 0) + 1
        hours = args.steady_hours * args.seeds
        for row in detect_rows:
            row.append(f"{alarms.get(str(row[0]), 0) / hours:.2f}")
        table(f"detection ({args.seeds} seeds; steady: {hours:g} h of noisy traffic)",
              ["kind", "scenario", "time to detect",
               "time to clear (deadline_risk: lead before the first miss)",
               "false alarms / h (steady)"], detect_rows)
        table("the actions on and off (mean over seeds; jobs/s: jobs that succeeded during "
              "the fault)", ["scenario", "actions", "jobs/s", "deadline misses",
                             "desired slots (most)", "on / off"],
              action_rows)
        r.close()
    total = sum(alarms.values())
    print(f"false alarms in {hours:g} h of steady traffic: {total} "
          f"({', '.join(f'{k} {v}' for k, v in alarms.items()) or 'none'}); "
          f"took {time.monotonic() - started:.0f} s")


def _range(values: list[float | None], none: str = "not raised") -> str:
    """The range of the values over the seeds; ``none`` for a seed without one."""
    seen = [v for v in values if v is not None]
    if not seen:
        return none if values else "-"
    missing = len(values) - len(seen)
    text = fmt(min(seen)) if min(seen) == max(seen) else f"{fmt(min(seen))}-{fmt(max(seen))}"
    return text + (f" ({missing}: {none})" if missing else "")


if __name__ == "__main__":
    main()

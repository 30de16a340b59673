"""The scheduler's Prometheus metrics: the batching, and (from the active scheduler only)
the cluster's view: jobs pending per class, their age, batches in flight, workers, the
scaling signal, and the job counters kept in Redis (``jobs.stats``).

A standby scheduler exports its own process metrics but not the cluster's, so a sum over
every scheduler counts each job once.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.stats import Count
from jobs.telemetry import PLAN_BUCKETS, SIMILARITY_BUCKETS, SIZE_BUCKETS, SLACK_BUCKETS
from scheduler.money import MoneyView


def _lane_metrics(lanes: dict[str, Any] | None) -> Iterator[Metric]:
    """The half-price lane: provider batches open, their jobs and the oldest's age, per
    deployment, and the jobs waiting in the scheduler to join one."""
    if lanes is None:
        return
    opened = GaugeMetricFamily("promptbatch_provider_batches_open", "Provider batches (a "
                               "provider's batch endpoint) not yet closed.",
                               labels=["provider", "model"])
    jobs = GaugeMetricFamily("promptbatch_provider_batch_jobs", "Jobs of the open provider "
                             "batches.", labels=["provider", "model"])
    age = GaugeMetricFamily("promptbatch_provider_batch_oldest_age_seconds", "Age of the "
                            "oldest open provider batch.", labels=["provider", "model"])
    for dep, row in lanes["deployments"].items():
        provider, _, model = dep.partition("|")
        opened.add_metric([provider, model], row["open"])
        jobs.add_metric([provider, model], row["jobs"])
        age.add_metric([provider, model], row["oldest_s"])
    yield from (opened, jobs, age)
    yield GaugeMetricFamily("promptbatch_provider_batch_waiting_jobs", "Jobs waiting in the "
                            "scheduler to join a provider batch.", value=lanes["waiting"])


class ClusterView(Collector):
    """Yields the latest overview the active scheduler computed (nothing while standing
    by). ``update`` is called from the scheduler loop; ``collect`` from the HTTP thread."""

    def __init__(self, tenant_label: bool) -> None:
        self.tenant_label = tenant_label
        self._lock = threading.Lock()
        self._overview: dict[str, Any] | None = None
        self._totals: list[Count] = []

    def update(self, overview: dict[str, Any] | None, totals: list[Count]) -> None:
        with self._lock:
            self._overview, self._totals = overview, totals

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            overview, totals = self._overview, self._totals
        if overview is None:
            return
        pending = GaugeMetricFamily("promptbatch_jobs_pending", "Jobs accepted and not yet "
                                    "sent to a worker, per class.", labels=["class"])
        oldest = GaugeMetricFamily("promptbatch_oldest_pending_age_seconds", "How long the "
                                   "oldest pending job of each class has waited.",
                                   labels=["class"])
        slack = GaugeMetricFamily("promptbatch_pending_deadline_slack_seconds", "Seconds "
                                  "left before the earliest deadline of a pending job, per "
                                  "class (absent: none has a deadline).", labels=["class"])
        inflight = GaugeMetricFamily("promptbatch_batches_in_flight", "Batches sent and not "
                                     "finished (queued in the broker or running), per class.",
                                     labels=["class"])
        for row in overview["classes"]:
            pending.add_metric([row["class"]], row["pending"])
            oldest.add_metric([row["class"]], row["oldest_wait_s"])
            inflight.add_metric([row["class"]], row["inflight"])
            if row["slack_s"] is not None:
                slack.add_metric([row["class"]], row["slack_s"])
        yield from (pending, oldest, slack, inflight)
        yield GaugeMetricFamily("promptbatch_workers", "Workers with a fresh heartbeat.",
                                value=overview["workers"])
        yield GaugeMetricFamily("promptbatch_worker_slots", "Pool processes of the workers "
                                "with a fresh heartbeat.", value=overview["slots"])
        yield GaugeMetricFamily(
            "promptbatch_desired_worker_slots", "Worker slots the work needs: every class "
            "meets its deadlines and the backlog drains within scale_horizon_s, capped by "
            "the providers' rate limits (scale workers on this).",
            value=overview["desired_slots"])
        cooling = GaugeMetricFamily("promptbatch_deployment_cooling_down", "1 while a "
                                    "deployment is avoided after failures in a row.",
                                    labels=["provider", "model"])
        for name in overview["cooling"]:
            provider, _, model = name.partition("|")
            cooling.add_metric([provider, model], 1)
        yield cooling
        yield from _lane_metrics(overview.get("lanes"))
        yield from self._counters(totals)

    def _counters(self, totals: list[Count]) -> Iterator[Metric]:
        names: dict[str, tuple[str, str, list[str]]] = {
            "submitted": ("promptbatch_jobs_submitted", "Jobs accepted (counted once, in "
                          "the step that queues them, whoever submitted them).",
                          ["class", "provider", "model"]),
                 "finished": ("promptbatch_jobs_finished", "Jobs that reached a final state "
                              "(counted once, in the step that stores the result).",
                              ["state", "class", "provider", "model"]),
                 "missed": ("promptbatch_deadline_misses", "Jobs that ended after their "
                            "deadline or expired.", ["class", "provider", "model"]),
                 "cache": ("promptbatch_cache_hits", "Jobs answered without a provider call "
                           "of their own: from the exact or the semantic cache, or by an "
                           "identical job's call (coalesced).",
                           ["kind", "class", "provider", "model"])}
        sums: dict[str, dict[tuple[str, ...], int]] = defaultdict(lambda: defaultdict(int))
        for c in totals:
            values = ([c.state] if c.kind in ("finished", "cache") else []) + [
                c.cls, c.provider, c.model]
            if self.tenant_label:
                values.append(c.tenant)
            sums[c.kind][tuple(values)] += c.value
        for kind, (name, doc, label_names) in names.items():
            family = CounterMetricFamily(
                name, doc, labels=label_names + (["tenant"] if self.tenant_label else []))
            for key, total in sorted(sums[kind].items()):
                family.add_metric(list(key), total)
            yield family


class AnomalyView(Collector):
    """The anomalies, from the active scheduler only (``scheduler.monitor``):
    ``promptbatch_anomaly_active`` (1 while active, 0 once cleared, for every
    ``kind, provider, model, replica`` ever raised) and
    ``promptbatch_anomalies_raised_total`` (kept in Redis, so it survives a change of
    scheduler)."""

    LABELS = ("kind", "provider", "model", "replica")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raised: dict[tuple[str, str, str, str], int] | None = None
        self._active: set[tuple[str, str, str, str]] = set()

    def update(self, raised: dict[tuple[str, str, str, str], int] | None,
               active: set[tuple[str, str, str, str]]) -> None:
        """The counts raised and the labels active now (None: standing by)."""
        with self._lock:
            self._raised = None if raised is None else dict(raised)
            self._active = set(active)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            raised, active = self._raised, self._active
        if raised is None:
            return
        gauge = GaugeMetricFamily(
            "promptbatch_anomaly_active", "1 while an anomaly of this kind is active on this "
            "deployment (replica empty), replica, or class (deadline_risk: provider empty, "
            "model the class), else 0.", labels=list(self.LABELS))
        counter = CounterMetricFamily(
            "promptbatch_anomalies_raised", "Anomalies raised (since the first scheduler).",
            labels=list(self.LABELS))
        for labels in sorted(set(raised) | active):
            gauge.add_metric(list(labels), 1 if labels in active else 0)
            counter.add_metric(list(labels), raised.get(labels, 0))
        yield gauge
        yield counter


class SchedulerMetrics:
    """One scheduler's metrics, in a registry of its own (a process may run several in
    tests)."""

    def __init__(self, tenant_label: bool = False) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.active = Gauge("promptbatch_scheduler_active", "1 while this scheduler holds "
                            "the lease.", registry=reg)
        self.plan_seconds = Histogram("promptbatch_plan_duration_seconds", "Time of one "
                                      "planning step of the policy.", buckets=PLAN_BUCKETS,
                                      registry=reg)
        self.pool_jobs = Gauge("promptbatch_pool_jobs", "Jobs in the scheduler's pool "
                               "(embedded, in FAISS).", registry=reg)
        self.backlog_jobs = Gauge("promptbatch_backlog_jobs", "Jobs read from intake and "
                                  "waiting for room in the pool.", registry=reg)
        self.batches_sent = Counter("promptbatch_batches_sent", "Batches sent to the "
                                    "workers.", ["class", "provider", "model"], registry=reg)
        self.batch_size = Histogram("promptbatch_batch_size", "Jobs per batch sent.",
                                    ["provider", "model"], buckets=SIZE_BUCKETS, registry=reg)
        self.similarity = Histogram("promptbatch_batch_similarity", "Mean cosine similarity "
                                    "of a batch's jobs to its seed.", ["provider", "model"],
                                    buckets=SIMILARITY_BUCKETS, registry=reg)
        self.slack = Histogram("promptbatch_deadline_slack_seconds", "Seconds left before a "
                               "job's deadline when its batch is sent (jobs with a "
                               "deadline).", ["class"], buckets=SLACK_BUCKETS, registry=reg)
        self.expired = Counter("promptbatch_scheduler_expired_jobs", "Jobs the scheduler "
                               "expired before sending them.", ["class"], registry=reg)
        self.semantic = Counter("promptbatch_cache_semantic_lookups", "Semantic cache "
                                "lookups by outcome: hit, miss (nothing above the "
                                "threshold), guarded (above it, refused by the guard).",
                                ["outcome"], registry=reg)
        self.semantic_best = Histogram("promptbatch_cache_semantic_best_similarity",
                                       "Similarity of the best candidate of each semantic "
                                       "lookup (to calibrate the threshold).",
                                       buckets=SIMILARITY_BUCKETS, registry=reg)
        self.cluster = ClusterView(tenant_label)
        reg.register(self.cluster)
        self.money = MoneyView()
        reg.register(self.money)
        self.anomalies = AnomalyView()
        reg.register(self.anomalies)
        labels = ["deployment", "replica"]
        self.replica_outstanding = Gauge(
            "promptbatch_replica_outstanding_batches", "Batches sent to a replica and not "
            "finished (cache-aware routing).", labels, registry=reg)
        self.replica_outstanding_s = Gauge(
            "promptbatch_replica_outstanding_seconds", "Estimated seconds of work sent to a "
            "replica and not finished, scaled by its learned latency ratio.", labels,
            registry=reg)
        self.replica_latency = Gauge(
            "promptbatch_replica_latency_ratio", "A replica's measured over estimated batch "
            "time, learned (1: as the scheduler estimates).", labels, registry=reg)
        self.replica_affinity = Gauge(
            "promptbatch_replica_affinity", "Batches routed to a replica because it held "
            "their prefix (hit) or not (miss), since the scheduler became active.",
            [*labels, "outcome"], registry=reg)
        self.replica_healthy = Gauge(
            "promptbatch_replica_healthy", "0 while a replica cools down after failures, "
            "else 1.", labels, registry=reg)

    def replicas(self, rows: list[dict[str, Any]]) -> None:
        """Set the replica gauges from ``Routing.snapshot()``."""
        for row in rows:
            labels = (row["deployment"], row["replica"].split("://", 1)[-1])
            self.replica_outstanding.labels(*labels).set(row["outstanding"])
            self.replica_outstanding_s.labels(*labels).set(row["outstanding_s"])
            self.replica_latency.labels(*labels).set(row["latency_ratio"])
            self.replica_affinity.labels(*labels, "hit").set(row["affinity_hits"])
            self.replica_affinity.labels(*labels, "miss").set(row["affinity_misses"])
            self.replica_healthy.labels(*labels).set(0 if row["cooling"] else 1)

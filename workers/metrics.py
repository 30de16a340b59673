"""The workers' Prometheus metrics: what happens to jobs and providers inside a batch.

Observed in the pool process that does the work (multiprocess mode under the prefork
pool: ``jobs.telemetry``). Job timings are observed only for results this process stored
first (the SQL store decides), so a job is observed once even if its batch ran twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from prometheus_client import Counter, Histogram

from jobs.models import JobResult
from jobs.stats import class_name

__all__ = ["class_name", "deployment_labels", "observe_results", "outcome_of"]
from jobs.telemetry import LATENCY_BUCKETS, SIZE_BUCKETS

QUEUE_WAIT = Histogram(
    "promptbatch_queue_wait_seconds",
    "Time from a job's acceptance to the start of its batch on a worker.",
    ["class"], buckets=LATENCY_BUCKETS)
LATENCY = Histogram(
    "promptbatch_job_latency_seconds",
    "Time from a job's acceptance to its final state (jobs that reached a worker).",
    ["class", "state"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter(
    "promptbatch_prompt_tokens",
    "Prompt tokens of finished jobs, as the provider reported them: cached (served from "
    "the provider's prefix cache) or computed.",
    ["provider", "model", "kind"])
COMPLETION_TOKENS = Counter(
    "promptbatch_completion_tokens", "Completion tokens of finished jobs.",
    ["provider", "model"])
BATCHES = Counter(
    "promptbatch_worker_batches", "Batches a worker ran, by outcome (ran, duplicate, "
    "poison).", ["class", "outcome"])
BATCH_SECONDS = Histogram(
    "promptbatch_batch_run_seconds", "Time a worker spent on one batch.",
    ["provider", "model"], buckets=LATENCY_BUCKETS)
BATCH_JOBS = Histogram(
    "promptbatch_batch_run_jobs", "Jobs of a batch that a worker sent to the provider.",
    ["provider", "model"], buckets=SIZE_BUCKETS)
REQUESTS = Counter(
    "promptbatch_provider_requests",
    "Jobs' requests to providers by outcome: ok, 429 (rate limited or overloaded), 5xx, "
    "timeout (or connection failure), malformed (a reply that is cut off or not what the "
    "API promises), error (any other refusal).",
    ["provider", "model", "outcome"])
REQUEST_SECONDS = Histogram(
    "promptbatch_provider_request_duration_seconds",
    "Time of one call to a provider (one call may carry several jobs).",
    ["provider", "model", "outcome"], buckets=LATENCY_BUCKETS)
RETRIES = Counter(
    "promptbatch_provider_retries", "Jobs' requests sent again after a transient error.",
    ["provider", "model"])
REPLICA_REQUESTS = Counter(
    "promptbatch_replica_calls",
    "Provider calls per replica of a deployment (a batch, or a part of one retried).",
    ["deployment", "replica"])
UNREPLICATED_STARTS = Counter(
    "promptbatch_unreplicated_starts_total",
    "Batches whose start no replica acknowledged within redis_wait_ms (under Sentinel): "
    "run anyway; a failover at that moment could start them again.")
INVALID_OUTPUTS = Counter(
    "promptbatch_invalid_outputs",
    "Answers that did not validate against the job's response format or tools "
    "(workers.promise), by outcome: retried (asked again), repaired (a job valid after "
    "being asked again), failed (a job ended FAILED with invalid_output).",
    ["provider", "model", "outcome"])
SPLITS = Counter(
    "promptbatch_provider_splits", "Requests split in halves (refused or failing as a "
    "whole, or too big for the rate limit).", ["provider", "model"])
FALLBACKS = Counter(
    "promptbatch_provider_fallbacks", "Calls sent to a fallback while the primary "
    "deployment cooled down, or had errors well above its baseline (errors_high).",
    ["primary", "fallback"])
COOLDOWNS = Counter(
    "promptbatch_provider_cooldowns", "Times a deployment started cooling down.",
    ["provider", "model"])
RATE_LIMIT_WAIT = Counter(
    "promptbatch_rate_limit_wait_seconds", "Time spent waiting for rate-limit budget.",
    ["provider", "model"])


def deployment_labels(deployment: str) -> tuple[str, str]:
    """``provider|model`` as the two labels."""
    provider, _, model = deployment.partition("|")
    return provider, model


def observe_results(results: Sequence[JobResult], classes: Sequence[int]) -> None:
    """Timings and tokens of results this process stored first. Each label set is looked
    up once per call and counters are added once per label set (a batch's results mostly
    share them: per result, the lookups cost more than storing the result)."""
    waits: dict[str, list[float]] = defaultdict(list)
    latencies: dict[tuple[str, str], list[float]] = defaultdict(list)
    tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for res, cls in zip(results, classes, strict=True):
        name = class_name(str(cls))
        if res.created_at is not None:
            if res.started_at is not None:
                waits[name].append(max(0.0, res.started_at - res.created_at))
            latencies[(name, res.state.value)].append(
                max(0.0, res.finished_at - res.created_at))
        if res.usage is not None:
            counts = tokens[(res.provider or "", res.model or "")]
            cached = res.usage.cached_tokens
            counts[0] += cached
            counts[1] += max(0, res.usage.prompt_tokens - cached)
            counts[2] += res.usage.completion_tokens
    for name, values in waits.items():
        histogram = QUEUE_WAIT.labels(name)
        for v in values:
            histogram.observe(v)
    for label, values in latencies.items():
        histogram = LATENCY.labels(*label)
        for v in values:
            histogram.observe(v)
    for (provider, model), (cached, computed, completion) in tokens.items():
        PROMPT_TOKENS.labels(provider, model, "cached").inc(cached)
        PROMPT_TOKENS.labels(provider, model, "computed").inc(computed)
        COMPLETION_TOKENS.labels(provider, model).inc(completion)


def outcome_of(error: str | None, transient: bool) -> str:
    """The outcome label of a provider's reply (see ``REQUESTS``)."""
    if error is None:
        return "ok"
    text = error.lower()
    if text.startswith(("http 429", "http 529")):
        return "429"
    if text.startswith("http 5"):
        return "5xx"
    if "timed out" in text or "connection failed" in text or "no complete response" in text:
        return "timeout"
    if "malformed" in text or "cut off" in text or "not json" in text or "no reply" in text:
        return "malformed"
    return "error" if not transient else "5xx"

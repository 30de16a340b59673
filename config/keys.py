"""Every Redis key name promptbatch uses, in one place (prefix ``pb:``).

Celery's own keys (queues, ``unacked``, ``celery-task-meta-*``) are named by Celery and
kombu; the ones we read or write are listed here too, so nothing else spells them out.
"""

from __future__ import annotations

from config.settings import PRIORITY_NAMES

PREFIX = "pb:"

#: Stream of job ids waiting for the scheduler (one entry per accepted, unsent job).
INTAKE = f"{PREFIX}intake"
#: Stream of events for the scheduler (cancellations, batches done), capped.
EVENTS = f"{PREFIX}events"
#: Seconds of batch-done events kept in ``EVENTS`` (trimmed by time as they are added).
EVENTS_KEEP_S = 120
#: Hash batch id -> JSON of a batch claimed by the scheduler and not yet confirmed sent.
OUTBOX = f"{PREFIX}outbox"
#: Sorted set ``{class}:{batch id}`` -> time claimed, of batches claimed and not yet
#: finished by a worker (see ``inflight_member``).
INFLIGHT = f"{PREFIX}inflight"
#: Sorted set provider batch id -> time claimed: the open provider batches of the
#: half-price lane (a provider's own batch endpoint), from their claim to their end. Their
#: jobs are AT_PROVIDER with the batch's id; the job store holds each one's record.
LANES = f"{PREFIX}lanes"
#: Hash worker hostname -> JSON {concurrency, queues, ts}, refreshed by worker heartbeats.
WORKERS = f"{PREFIX}workers"
#: The scheduler lease (value: the holder's token; the steps that change what the
#: scheduler owns check it: fencing).
SCHEDULER_LEASE = f"{PREFIX}scheduler:lease"
#: Set once by the first scheduler; gone means Redis lost its data (the reconciler then
#: writes back every recent result).
ALIVE = f"{PREFIX}alive"
#: JSON ``{"id": the job store's id, "where": its URL without password}``: the store the
#: processes on this Redis share; a process with another store refuses to work.
STORE = f"{PREFIX}store"
#: Hash of the reconciler: ``pass`` (JSON position of the pass under way), ``started``
#: and ``finished`` (Unix times of the last pass), so a scheduler that takes over continues.
RECONCILE = f"{PREFIX}reconcile"
#: Hash provider/model -> JSON list of recent (batch size, seconds) observations.
SERVICE_TIMES = f"{PREFIX}service_times"
#: Hash of the cluster's job counters, counted in the Lua step that accepts a job or
#: stores its result (so once each): ``s|class|tenant|provider|model`` submitted,
#: ``f|state|class|tenant|provider|model`` finished, ``m|class|tenant|provider|model``
#: finished after the deadline (or expired). ``jobs.stats`` reads them.
STATS = f"{PREFIX}stats"
#: Stream of the ids whose results were just stored (one entry per store step, field
#: ``ids``, comma-separated): a client waiting for many results reads it instead of
#: polling every pending result key.
DONE = f"{PREFIX}done"
#: Seconds of entries kept in ``DONE`` (approximately; older ones are trimmed by time, so
#: its size follows the rate of results, not how many there have been): a reader that
#: falls further behind finds its results by reading them (every reader also sweeps).
DONE_KEEP_S = 60
#: JSON overview the active scheduler writes every second (``promptbatch status``).
OVERVIEW = f"{PREFIX}overview"
#: Sorted set deployment (``provider|model``) -> Unix time its cool-down ends: the
#: deployments cooling down, read without scanning the keyspace (``cooldown`` is the
#: flag each batch checks; this is the list the overview shows).
COOLING = f"{PREFIX}cooling"
#: Sorted set partition -> Unix time an entry was last stored in it: the result cache's
#: partitions, so a purge finds their entries without scanning the keyspace.
CACHE_PARTITIONS = f"{PREFIX}cache:parts"
#: Sorted set ``{semantic partition}\t{entry key}`` -> Unix time its vector was stored:
#: every vector of the semantic index, oldest first (the bound evicts from the front; a
#: scheduler that takes over reloads from it).
CACHE_VECTOR_ORDER = f"{PREFIX}cache:vorder"
#: Hash of the learned baselines, ``signal|provider|model|replica|size class`` -> JSON
#: ``{level, spread, samples, blocks, at}`` (``scheduler.baselines``): written by the active
#: scheduler every few seconds, read by the one that takes over.
BASELINES = f"{PREFIX}baselines"
#: Hash of the anomalies active now, id (``kind|signal|provider|model|replica``) -> JSON.
ANOMALIES = f"{PREFIX}anomalies"
#: Sorted set of cleared anomalies (JSON) by the time they cleared: the recent ones, at
#: most ``anomaly_recent_max``, none older than ``retention_days``.
ANOMALIES_RECENT = f"{PREFIX}anomalies:recent"
#: Hash ``kind|provider|model|replica`` -> anomalies raised since the first scheduler (the
#: counter ``promptbatch_anomalies_raised_total``, kept across schedulers).
ANOMALIES_RAISED = f"{PREFIX}anomalies:raised"

#: Celery's result backend key prefix (celery.backends.base.KeyValueStoreBackend).
CELERY_RESULT_PREFIX = "celery-task-meta-"


def job(job_id: str) -> str:
    """Hash of one job: ``spec`` (JSON), ``state``, ``sid`` (intake entry), ``batch``."""
    return f"{PREFIX}job:{job_id}"


def batch_run(batch_id: str) -> str:
    """Which send of a batch a worker runs (guards against a batch sent twice)."""
    return f"{PREFIX}batch:{batch_id}:run"


def batch_deliveries(batch_id: str) -> str:
    """How many times a batch's task was delivered to a worker (poison detection)."""
    return f"{PREFIX}batch:{batch_id}:deliveries"


def tenant_pending(tenant: str) -> str:
    """Set of a tenant's job ids waiting in intake (for the per-tenant quota)."""
    return f"{PREFIX}tenant:{tenant}:pending"


def rate_bucket(name: str) -> str:
    """Token bucket of a shared rate limit."""
    return f"{PREFIX}rate:{name}"


def inflight_member(cls: int, batch_id: str) -> str:
    """A batch's member of ``INFLIGHT``: its class, so capacity can be counted per class."""
    return f"{cls}:{batch_id}"


def replica(deployment: str, url: str) -> str:
    """A replica's name, under which its health and cool-down are kept (``Health``), its
    metrics labelled and ``status`` shows it: ``provider|model@host:port/path``."""
    return f"{deployment}@{url.split('://', 1)[-1]}"


def recent(bucket: int) -> str:
    """Counters of one 10-second bucket (``s|class``, ``f|state|class``, ``m|class``), kept
    a few minutes, for rates over the last minute."""
    return f"{PREFIX}recent:{bucket}"


def celery_result(task_id: str) -> str:
    """Celery's result key of a task (and of a job: results are stored under job ids)."""
    return f"{CELERY_RESULT_PREFIX}{task_id}"


def queue(priority: int) -> str:
    """Celery queue (and Redis list) of a priority class, 0 highest."""
    return f"pb.{PRIORITY_NAMES[priority]}"


#: All class queues, highest priority first.
QUEUES: tuple[str, ...] = tuple(queue(p) for p in range(len(PRIORITY_NAMES)))


def cooldown(deployment: str) -> str:
    """Set while a failing deployment (``provider|model``) cools down."""
    return f"{PREFIX}cooldown:{deployment}"


def healthy(deployment: str) -> str:
    """Set, with a TTL, while a deployment (``provider|model``) has answered recently."""
    return f"{PREFIX}healthy:{deployment}"


def avoid(deployment: str) -> str:
    """Set, with a short TTL the active scheduler renews, while a deployment
    (``provider|model``) has ``errors_high``: workers send its batches to a fallback
    (``Settings.fallbacks``) but for a probe share."""
    return f"{PREFIX}avoid:{deployment}"


def failures(deployment: str) -> str:
    """Transient failures in a row of a deployment."""
    return f"{PREFIX}failures:{deployment}"


# --- the result cache (``jobs.cache``) ----------------------------------------------------

def cache_entry(key: str) -> str:
    """A cached result (JSON), under its exact key ``partition:hash``."""
    return f"{PREFIX}cache:e:{key}"


def cache_index(partition: str) -> str:
    """Sorted set of a partition's entries by time stored (the oldest leave first)."""
    return f"{PREFIX}cache:z:{partition}"


def cache_sizes(partition: str) -> str:
    """Hash entry key -> its size in bytes, for a partition's byte bound."""
    return f"{PREFIX}cache:s:{partition}"


def cache_bytes(partition: str) -> str:
    """Bytes of a partition's entries."""
    return f"{PREFIX}cache:b:{partition}"


def cache_lead(key: str) -> str:
    """The job whose provider call identical requests wait for (coalescing)."""
    return f"{PREFIX}cache:lead:{key}"


def cache_followers(key: str) -> str:
    """Set of the jobs waiting for the lead job of ``key``."""
    return f"{PREFIX}cache:f:{key}"


def cache_vectors(partition: str) -> str:
    """Hash entry key -> embedding (float32 bytes) of a semantic partition."""
    return f"{PREFIX}cache:v:{partition}"



def job_stream(job_id: str) -> str:
    """Redis Stream of a streaming job's output: ``attempt`` (a new provider attempt:
    discard what came before), ``t`` (a chunk of text), ``end`` (the final state)."""
    return f"{PREFIX}stream:{job_id}"

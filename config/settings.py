"""All of promptbatch's settings, in one validated class.

Values come, highest precedence first, from keyword arguments, environment variables
prefixed ``PROMPTBATCH_`` (``PROMPTBATCH_REDIS_URL=redis://...``), a ``.env`` file in the
working directory, and the defaults below. Secrets are ``SecretStr`` so that they never
appear in a ``repr``, a log line or a stored record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.redisaddr import SentinelAddress, is_sentinel, parse_sentinels

#: Providers that may have replicas (HTTP providers with a base URL).
REPLICATED_PROVIDERS = ("openai", "anthropic")

#: Providers with a batch endpoint at a discount (``batch_api``): OpenAI's Batch API,
#: Anthropic's Message Batches.
BATCH_API_PROVIDERS = ("openai", "anthropic")

#: URL schemes of a RabbitMQ broker (``broker_url``).
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")

#: Priority class names, highest first. Their index is the numeric priority (0 highest).
PRIORITY_NAMES: tuple[str, ...] = ("critical", "high", "normal", "low", "bulk")

OpenAIPrefixStrategy = Literal["auto", "sequential", "warm_then_parallel", "parallel"]

#: The kinds of anomaly the scheduler raises (``scheduler.anomalies``).
AnomalyKind = Literal["latency_high", "throughput_low", "errors_high", "cache_hit_low",
                      "deadline_risk"]


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/promptbatch``, else ``~/.local/share/promptbatch``: one absolute
    place, whatever folder a command starts in."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "promptbatch"


class FileSecretsSource(EnvSettingsSource):
    """``PROMPTBATCH_<NAME>_FILE=/run/secrets/x``: the field's value is that file's content
    (the Docker secrets convention), unless ``PROMPTBATCH_<NAME>`` itself is set."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        env_name = f"{self.env_prefix}{field_name}".upper()
        path = os.environ.get(f"{env_name}_FILE")
        if not path or env_name in os.environ:
            return None, field_name, False
        try:
            content = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{env_name}_FILE={path}: cannot read it ({exc.strerror})") from exc
        return content, field_name, self.field_is_complex(field)


class ReplicaEntry(BaseModel):
    """One replica of an HTTP provider (``provider_replicas``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    cache_tokens: int | None = Field(default=None, ge=0)


class PriceEntry(BaseModel):
    """A deployment's price, US dollars per million tokens (``prices``). A field left out
    comes from the price library's price of the deployment, if it has one; else cached
    input and cache writes cost as input, and the batch discount is the provider's
    (0.5 for openai and anthropic, else 1: no discount)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cached_input: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_write: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    output: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    #: The fraction of the price paid through the provider's batch endpoint.
    batch_discount: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    #: Output tokens a job without max_tokens is taken to cost, for budgets.
    default_output_tokens: int | None = Field(default=None, ge=1)


class Settings(BaseSettings):
    """promptbatch's configuration. Every field can be set as ``PROMPTBATCH_<NAME>``, or
    read from a file named by ``PROMPTBATCH_<NAME>_FILE`` (Docker secrets)."""

    model_config = SettingsConfigDict(
        env_prefix="PROMPTBATCH_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- Where things live -------------------------------------------------------------
    redis_url: str = Field(
        default="",
        description="Redis/Valkey URL for broker, result backend and intake. Empty means: "
        "`promptbatch run` starts an embedded Valkey server on a free loopback port.",
    )
    broker_url: str = Field(
        default="",
        description="Celery broker of the batch tasks. Empty: the Redis of redis_url. "
        "amqp://user:password@host:5672/vhost: RabbitMQ (durable queues, one per class, "
        "publisher confirms, late acks: a lost worker's batch is delivered again at once); "
        "job state, results and the cache stay in Redis.")
    redis_sentinels: str = Field(
        default="",
        description="Find the Redis primary through Sentinel: the sentinels as "
        "'host:port,host:port,...' (with redis_sentinel_master). Every process then follows "
        "a failover without a restart. Replaces redis_url (which may then be left empty).")
    redis_sentinel_master: str = Field(
        default="", description="The name the sentinels know the primary by (their "
        "'sentinel monitor NAME ...').")
    redis_password: SecretStr | None = Field(
        default=None, description="Password of the Redis primary and its replicas, under "
        "Sentinel (or PROMPTBATCH_REDIS_PASSWORD_FILE). A plain redis_url carries its own.")
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="Password of the sentinels themselves, when their "
        "configuration sets one (or PROMPTBATCH_REDIS_SENTINEL_PASSWORD_FILE).")
    redis_wait_replicas: int | None = Field(
        default=None, ge=0, le=16,
        description="Replicas that must hold a batch's start before its provider call "
        "(Redis WAIT): a failover then never starts that batch again. Default: 1 under "
        "Sentinel, 0 (no wait) otherwise.")
    redis_wait_ms: int = Field(
        default=500, ge=1, le=60_000,
        description="Longest a worker waits for redis_wait_replicas; past it the call goes "
        "ahead (a replica that lags must not stop the service) and is counted in "
        "promptbatch_unreplicated_starts_total.")
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL of the durable job store. Empty: the SQLite file "
        "promptbatch.db in data_dir, the same from any folder. PostgreSQL: "
        "postgresql+psycopg://user:password@host:5432/db (extra 'postgres').",
    )
    database_pool_size: int = Field(
        default=5, ge=1, le=200,
        description="PostgreSQL: connections each process keeps open (API processes, the "
        "scheduler, every worker pool process: size the server's max_connections for "
        "their sum, plus database_max_overflow each).")
    database_max_overflow: int = Field(
        default=10, ge=0, le=200,
        description="PostgreSQL: connections a process may open beyond the pool at a peak.")
    database_statement_timeout_s: float = Field(
        default=30.0, gt=0,
        description="PostgreSQL: longest a statement may run (the API's own requests give up "
        "sooner, at api_dependency_timeout_s).")
    data_dir: Path = Field(
        default_factory=lambda: default_data_dir(),
        description="Folder for local state: the default SQLite file, the embedded server's "
        "AOF data, `promptbatch up`'s state. Default: $XDG_DATA_HOME/promptbatch "
        "(~/.local/share/promptbatch); a relative path is taken from the current folder.",
    )

    # --- Limits on what is accepted ---------------------------------------------------
    max_prompt_chars: int = Field(
        default=400_000, ge=1, description="Longest prompt accepted, in characters."
    )
    max_image_bytes: int = Field(
        default=5 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="Largest image given inline (a data: URL), decoded; a bigger one is "
        "refused with HTTP 422 naming its field (messages.N.content.M.image_url.url). "
        "Default 5 MiB, Anthropic's bound per image. An image sent by http(s) URL is "
        "fetched by the provider and has no bound here. A request must also fit its body "
        "limit (api_max_request_bytes, api_max_body_bytes): base64 makes an image a third "
        "larger.")
    max_pending_per_tenant: int = Field(
        default=1_000_000,
        ge=1,
        description="Most jobs a tenant may have waiting in the scheduler; a submit beyond "
        "this is refused with TenantQuotaExceeded (HTTP 429).",
    )
    default_tenant: str = Field(default="default", description="Tenant of jobs that name none.")
    tenant_providers: dict[str, list[str]] = Field(
        default_factory=lambda: {"*": ["*"]},
        description="Which providers and models each tenant may use (JSON): tenant -> list "
        "of 'provider' (any allowed model of it), 'provider|model', or '*' (everything). "
        "'*' as a tenant is the entry of every tenant not listed; without it, an unlisted "
        "tenant may use nothing. A job naming anything else is refused (HTTP 422 naming "
        "the field). Example: '{\"*\": [\"openai|gpt-4o-mini\"], \"research\": "
        "[\"openai\", \"anthropic\"]}'.",
    )

    # --- The HTTP API ---------------------------------------------------------------
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="API key -> tenant, for a single-node set-up (JSON). More keys live in "
        "the SQL table api_keys (`promptbatch keys add`). Keys are never logged or stored "
        "in Redis; the table stores their SHA-256.",
    )
    api_admin_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Admin API key -> its own tenant (JSON). An admin key may name any "
        "tenant in a job and read every tenant's jobs (a backend service acting for its "
        "customers). `promptbatch keys add TENANT --admin` stores one in SQL instead.",
    )
    api_max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024,
        description="Largest body of POST /v1/jobs (HTTP 413 above, checked before the body "
        "is read).")
    api_max_request_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024,
        description="Largest body of a single-job request (chat and text completions, the "
        "Batch API's JSON requests); HTTP 413 above, checked before the body is read. The "
        "default carries one inline image at max_image_bytes (5 MiB, 6.7 MiB in base64) "
        "and its text.")
    api_max_file_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1024,
        description="Largest file upload (POST /v1/files, the Batch API's input files; "
        "HTTP 413 above, checked before the body is read).")
    api_max_json_depth: int = Field(
        default=32, ge=4, le=512,
        description="Deepest nesting of arrays and objects a JSON body or Batch API line may "
        "have (HTTP 400 deeper).")
    api_max_jobs_per_request: int = Field(
        default=10_000, ge=1, description="Most jobs in one POST /v1/jobs.")
    api_max_wait_s: float = Field(
        default=60.0, gt=0, description="Longest long-poll of GET /v1/jobs/{id}/result.")
    api_dependency_timeout_s: float = Field(
        default=1.5, gt=0,
        description="How long the API waits for Redis or SQL before answering 503.")
    batch_provider: str = Field(
        default="",
        description="Provider of OpenAI Batch API jobs (empty: default_provider).")

    # --- Scheduling and batching ------------------------------------------------------
    embedder: Literal["hashed", "minilm"] = Field(
        default="hashed",
        description="How prompts are embedded for similarity: 'hashed' (numpy character "
        "n-grams, no model files) or 'minilm' (all-MiniLM-L6-v2 int8 on onnxruntime; needs "
        "the 'semantic' extra).",
    )
    embedding_dim: int = Field(
        default=256, ge=16, le=4096, description="Dimensions of the 'hashed' embedder."
    )
    similarity_threshold: float = Field(
        default=0.55,
        ge=-1.0,
        le=1.0,
        description="Cosine similarity above which a neighbour joins a seed's batch.",
    )
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Most jobs in one batch.")
    max_batch_tokens: int = Field(
        default=64_000,
        ge=1,
        description="Most estimated prompt tokens in one batch (a batch always takes its seed).",
    )
    max_wait_ms: tuple[float, float, float, float, float] = Field(
        default=(0.0, 20.0, 200.0, 2_000.0, 30_000.0),
        description="Longest a batch seed waits for companions, per class (critical, high, "
        "normal, low, bulk), in milliseconds. Set as JSON: '[0,20,200,2000,30000]'.",
    )
    aging_s: float = Field(
        default=600.0,
        gt=0,
        description="A job pending this long is promoted one class, so no class starves.",
    )
    deadline_guard_ms: float = Field(
        default=250.0,
        ge=0,
        description="A job whose slack (deadline - now - estimated service time) falls "
        "under this is sent at once.",
    )
    reserved_slots: int | None = Field(
        default=None,
        ge=0,
        description="Worker processes that normal, low and bulk batches leave free for "
        "critical and high work (a running batch cannot be preempted). Default: a quarter "
        "of the worker processes, rounded down.",
    )
    faiss_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="OpenMP threads FAISS may use in the scheduler. One is fastest for the "
        "scheduler's small searches on a shared machine, and leaves cores to the workers.",
    )
    scheduler_tick_ms: float = Field(
        default=10.0, gt=0, le=1_000, description="Longest the scheduler blocks for new work."
    )
    scheduler_read_count: int = Field(
        default=5_000, ge=1,
        description="Most intake entries the scheduler reads, and most jobs it admits to its "
        "pool, per tick.",
    )
    max_pool_jobs: int = Field(
        default=20_000, ge=1,
        description="Most jobs the scheduler holds in its pending pool (about 1.6 KB each: "
        "vector and indexes). More waiting jobs stay in Redis, known to the scheduler by "
        "id, class and tenant (a few dozen bytes each), and are admitted as room frees, "
        "highest class first and tenants in turn.",
    )
    lease_ttl_s: float = Field(
        default=5.0,
        gt=0,
        description="Time-to-live of the scheduler lease; a standby takes over this long "
        "after the active scheduler stops renewing.",
    )
    reconcile_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="The reconciler leaves jobs younger than this alone: their producer may "
        "be between its SQL write and its Redis write.",
    )
    reconcile_write_back: bool = Field(
        default=True,
        description="The reconciler writes results the result backend lacks back to it "
        "(off: for a stack whose one reader falls back to the job store and deletes what it "
        "has read, as `promptbatch run`'s).")
    reconcile_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="How often the active scheduler compares SQL with Redis and re-enqueues "
        "jobs that Redis lost.",
    )

    # --- Workers ----------------------------------------------------------------------
    worker_concurrency: int = Field(
        default=2, ge=1, le=512, description="Pool processes per `promptbatch worker`."
    )
    task_time_limit_s: int = Field(
        default=300,
        ge=5,
        description="Hard time limit of one batch task. Must stay below visibility_timeout_s.",
    )
    visibility_timeout_s: int = Field(
        default=360,
        ge=10,
        description="Seconds before the broker re-delivers an unacknowledged batch task.",
    )
    max_deliveries: int = Field(
        default=3, ge=1,
        description="A batch whose task killed its worker this many times is split into "
        "one task per job; a single job that does is FAILED (a poison job).",
    )
    result_ttl_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="How long a result stays in the Celery result backend (result_expires).",
    )
    payload_ttl_s: int = Field(
        default=14 * 24 * 3600,
        ge=60,
        description="Time-to-live of a job's payload in Redis; SQL keeps the durable record.",
    )

    # --- Providers --------------------------------------------------------------------
    default_provider: str = Field(default="echo", description="Provider of jobs that name none.")
    default_model: str = Field(default="", description="Model of jobs that name none "
                               "(empty: the provider's own default).")
    allowed_models: dict[str, list[str]] = Field(
        default_factory=lambda: {"echo": ["echo-1"], "simulated": ["sim-1"]},
        description="Models a job may name, per provider; a provider not listed (or with "
        "an empty list) accepts any well-formed model name. JSON: '{\"openai\": [\"gpt-4o\"]}'.",
    )
    echo_test_hooks: bool = Field(
        default=False,
        description="echo: obey the test hooks written in prompts ('[echo:sleep=N]' holds "
        "the worker N seconds, '[echo:crash]' kills it). Only for tests: with it on, anyone "
        "who may submit an echo job can stall or kill workers.",
    )
    echo_call_log: Path | None = Field(
        default=None,
        description="echo: append one JSON line per provider call (process id and job ids) "
        "to this file, so tests count calls where they happen.",
    )
    simulated_call_overhead_ms: float = Field(
        default=40.0, ge=0, description="simulated: fixed cost of one call to the server."
    )
    simulated_prefill_us_per_token: float = Field(
        default=120.0, ge=0, description="simulated: cost of one uncached prompt token."
    )
    simulated_decode_ms_per_step: float = Field(
        default=4.0,
        ge=0,
        description="simulated: cost of one decode step; one step yields a token for every "
        "request in a decode group.",
    )
    simulated_decode_group: int = Field(
        default=8,
        ge=1,
        description="simulated: requests that decode together in one step (continuous batching).",
    )
    simulated_cache_tokens: int = Field(
        default=200_000,
        ge=0,
        description="simulated: capacity of the LRU prefix cache, in tokens.",
    )
    simulated_concurrency: int = Field(
        default=4, ge=1, description="simulated: calls the modelled server runs at once."
    )
    simulated_time_scale: float = Field(
        default=1.0,
        ge=0,
        description="simulated: factor on every modelled duration (0 reports the usage "
        "without sleeping).",
    )
    simulated_invalid_rate: float = Field(
        default=0.0, ge=0, le=1,
        description="simulated: share of its JSON answers (response formats, tool "
        "arguments) cut in half, as a model without constrained decoding may answer; drawn "
        "from a digest of the request, so a request asked again draws anew. For trying the "
        "schema promise (schema_retries) at scale.",
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        description="openai: base URL of any OpenAI-compatible server (include /v1). A "
        "comma-separated list names replicas of one deployment (several vLLM, SGLang or "
        "llama.cpp servers of one model): batches are routed over them by prefix and load.",
    )
    openai_api_key: SecretStr = Field(
        default=SecretStr(""), description="openai: API key, never logged or stored."
    )
    openai_prefix_strategy: OpenAIPrefixStrategy = Field(
        default="auto",
        description="openai: how a batch's requests are sent so the server's prefix cache "
        "works: 'sequential' (per-slot caches, llama.cpp), 'warm_then_parallel' (one shared "
        "cache: vLLM, SGLang, OpenAI), 'parallel', or 'auto' (ask the server).",
    )
    anthropic_base_url: str = Field(
        default="https://api.anthropic.com",
        description="anthropic: base URL of the Messages API (a comma-separated list: "
        "replicas, as for openai_base_url).",
    )
    provider_replicas: dict[str, list[ReplicaEntry]] = Field(
        default_factory=dict,
        description="Replicas of an HTTP provider with a weight and a prompt cache size each "
        "(JSON): provider -> [{\"url\": ..., \"weight\": 1, \"cache_tokens\": 100000}]. "
        "Without it, a comma-separated base URL lists replicas of weight 1 and "
        "routing_cache_tokens each. Batches are routed to the replica most likely to hold "
        "their prefix (README: Replicas and routing).")
    routing_policy: Literal["cache_aware", "round_robin", "least_outstanding"] = Field(
        default="cache_aware",
        description="How batches are spread over a deployment's replicas: cache_aware (to the "
        "replica holding their prefix, within the load bounds below), round_robin, or "
        "least_outstanding (fewest batches in flight); the last two as a load balancer "
        "would, for comparison.")
    routing_cache_tokens: int = Field(
        default=100_000, ge=0,
        description="Prompt-cache tokens a replica is taken to hold, when its entry names none "
        "(llama-server: its --cache-ram over the model's KV bytes per token; vLLM: its KV "
        "blocks times block size).")
    routing_imbalance_batches: float = Field(
        default=4.0, ge=0,
        description="A replica holding a batch's prefix keeps it while its outstanding work is "
        "at most this many batches above the least loaded replica's (measured: "
        "bench/routing.py).")
    routing_idle_batches: float = Field(
        default=1.0, ge=0,
        description="...unless the least loaded replica has less than this many batches of "
        "work: an idle replica then takes the batch (affinity never leaves capacity idle).")
    anthropic_api_key: SecretStr = Field(
        default=SecretStr(""), description="anthropic: API key, never logged or stored."
    )
    openai_endpoint: Literal["chat", "completions"] = Field(
        default="chat",
        description="openai: '/v1/chat/completions' (one request per job), or "
        "'/v1/completions' (a batch's plain prompts in one request, as a list).",
    )
    openai_prompt_cache_key: bool = Field(
        default=True,
        description="openai: send 'prompt_cache_key' derived from the batch's shared prefix, "
        "so OpenAI routes the batch's requests to the same cache.",
    )
    anthropic_version: str = Field(default="2023-06-01",
                                   description="anthropic: the anthropic-version header.")
    anthropic_min_cache_tokens: int = Field(
        default=1024,
        ge=0,
        description="anthropic: a batch's shared prefix is marked with cache_control when it "
        "is at least this many (estimated) tokens; below it Anthropic does not cache.",
    )
    anthropic_default_max_tokens: int = Field(
        default=1024, ge=1, description="anthropic: max_tokens of jobs that set none."
    )
    provider_concurrency: int = Field(
        default=8, ge=1, le=256,
        description="Requests one worker process has in flight to one provider at once.",
    )
    provider_connect_timeout_s: float = Field(default=5.0, gt=0,
                                              description="HTTP connect timeout.")
    provider_read_timeout_s: float = Field(
        default=60.0, gt=0, description="HTTP read timeout: longest silence from the server.")
    provider_total_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest one HTTP request may take, start to end.")
    provider_max_attempts: int = Field(
        default=4, ge=1, le=20,
        description="Calls a job gets for transient errors (429, 529, 5xx, timeouts, "
        "resets) before it ends FAILED.",
    )
    provider_retry_base_s: float = Field(
        default=0.5, ge=0, description="First backoff after a transient error; doubles, "
        "with up to 25% jitter.")
    provider_retry_max_s: float = Field(
        default=30.0, ge=0, description="Longest backoff, and the longest Retry-After honoured.")
    schema_retries: int = Field(
        default=1, ge=0, le=5,
        description="Times an answer that does not validate (not JSON, or not what the "
        "job's json_schema or a tool's parameters ask) is asked again, within the job's "
        "deadline, with the validation error; then the job ends FAILED with error_code "
        "'invalid_output' and the raw answer kept.",
    )
    provider_split_after: int = Field(
        default=2, ge=1,
        description="A group of requests that fails as a whole this many times in a row is "
        "split in halves, each retried on its own.",
    )
    rate_limits: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Shared limits per 'provider|model' (or 'provider'): {'rpm': requests "
        "per minute, 'tpm': tokens per minute, 'per_tenant': 1 to apply them per tenant}. "
        "Workers wait for budget instead of sending into a 429.",
    )
    fallbacks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Ordered alternatives per 'provider|model', e.g. "
        "{'openai|gpt-4o': ['anthropic|claude-sonnet-4-5']}; used while a deployment cools "
        "down.",
    )
    prices: dict[str, PriceEntry] = Field(
        default_factory=dict,
        description="Prices per 'provider|model' in US dollars per million tokens, over the "
        "price library's (genai-prices): {'openai|gpt-4o': {'input': 2.5, 'cached_input': "
        "1.25, 'cache_write': 2.5, 'output': 10, 'batch_discount': 0.5}}. A deployment "
        "with no price here nor in the library has cost null (one warning at start).")
    budget_output_tokens: int = Field(
        default=1024, ge=1,
        description="Output tokens a job without max_tokens is taken to cost when a budget "
        "reserves its estimate (a deployment's own default_output_tokens, in prices, wins).")
    provider_health_window_s: float = Field(
        default=60.0, gt=0,
        description="A deployment that answered within this many seconds is healthy; one "
        "that has not gets one request of a batch first, and the rest only once it answers.")
    cooldown_failures: int = Field(
        default=3, ge=1,
        description="Transient failures in a row after which a deployment cools down.")
    cooldown_s: float = Field(default=60.0, gt=0,
                              description="How long a failing deployment is avoided.")

    # --- The providers' batch endpoints (the half-price lane) ---------------------------
    batch_api: dict[str, bool] = Field(
        default_factory=dict,
        description="Deployments whose provider's batch endpoint (OpenAI's Batch API, "
        "Anthropic's Message Batches) promptbatch may use, at the provider's batch discount "
        "(JSON): 'provider|model' or 'provider' -> true/false, the more precise entry "
        "winning. Example: '{\"openai|gpt-4o-mini\": true}'. Bulk jobs that can wait go "
        "there by themselves (README: Cost, budgets and the batch lane).")
    batch_api_enabled: bool = Field(
        default=True,
        description="The half-price lane as a whole: false sends every job on the fast path "
        "(provider batches already open are still followed to their end).")
    batch_api_margin_s: float = Field(
        default=3600.0, ge=0,
        description="A bulk job goes to a provider batch on its own only when its deadline "
        "(or none) leaves the provider's completion window (24 h) plus this margin, plus the "
        "time it may wait for others to join its batch.")
    batch_api_wait_s: float | None = Field(
        default=None, ge=0,
        description="Longest a job waits in the scheduler for others to join its provider "
        "batch (a batch leaves earlier once it reaches the provider's limits). Default: the "
        "bulk class's max_wait_ms.")
    batch_api_max_requests: int | None = Field(
        default=None, ge=1,
        description="Most requests in one provider batch, below the provider's own limit "
        "(OpenAI 50,000 requests or 200 MB a file, Anthropic 100,000 requests or 256 MB).")
    batch_api_poll_min_s: float = Field(
        default=10.0, gt=0,
        description="First wait before a provider batch's status is asked; the wait doubles "
        "at each poll up to batch_api_poll_max_s (one request per open provider batch).")
    batch_api_poll_max_s: float = Field(
        default=300.0, gt=0, description="Longest wait between two polls of a provider batch.")
    batch_api_submit_retry_s: float = Field(
        default=600.0, gt=0,
        description="A provider batch whose upload has not been confirmed after this long "
        "(its worker was lost) is taken up again; the provider is asked first whether it "
        "has it already, so it is never created twice.")
    batch_api_test_fault: Path | None = Field(
        default=None,
        description="Only for tests: a file naming a point of a provider batch's upload "
        "('after_create', 'after_record') where the process that reaches it exits at once; "
        "the file is removed first, so it happens once.")

    api_cancel_on_disconnect: bool = Field(
        default=True, description="A caller of the OpenAI-compatible endpoints that goes "
        "away before its job started cancels the job (not a call with an idempotency key: "
        "its retry with the key gets the job's answer).")
    model_aliases: dict[str, str] = Field(
        default_factory=dict, description="Public model names of the OpenAI-compatible "
        "endpoints -> 'provider|model', e.g. {'gpt-4o': 'openai|gpt-4o', 'fast': "
        "'simulated|sim-small'}. Other names: 'provider|model', or a model of the default "
        "provider.")
    cache_enabled: bool = Field(
        default=True, description="The result cache and the coalescing of identical requests "
        "(jobs choose with their 'cache' field; 'auto' caches deterministic requests only).")
    cache_ttl_s: int = Field(default=24 * 3600, ge=1,
                             description="How long a cached result is served.")
    cache_max_entries: int = Field(
        default=100_000, ge=1, description="Most cached results per partition (tenant, "
        "provider, model); the oldest go first.")
    cache_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024,
        description="Most bytes of cached results per partition; the oldest go first.")
    cache_shared_tenants: list[str] = Field(
        default_factory=list, description="Tenants that share one cache partition (their "
        "answers serve each other); every other tenant has its own.")
    cache_model_versions: dict[str, str] = Field(
        default_factory=dict, description="'provider|model' -> a version string; changing it "
        "invalidates the model's cached results (they are no longer found, and expire).")
    cache_semantic_tenants: list[str] = Field(
        default_factory=list, description="Tenants whose jobs may use the semantic cache "
        "(cache='semantic'); '*' for all.")
    cache_semantic_threshold: float = Field(
        default=0.95, gt=0, le=1, description="Cosine similarity a semantic hit needs (the "
        "guard on numbers, negations and names applies as well).")
    cache_semantic_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per tenant thresholds of the semantic cache.")
    cache_semantic_max_entries: int = Field(
        default=100_000, ge=1, description="Most prompts the semantic index holds (all "
        "partitions together, in the active scheduler's memory and in Redis); the oldest "
        "leave first.")
    cache_semantic_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Most bytes of vectors the semantic "
        "index holds (dimensions x 4 bytes each, plus its key); the oldest leave first.")
    retention_days: float = Field(
        default=30.0, ge=0, description="Final jobs, their results, idempotency keys, Batch "
        "API records and files older than this many days (and provider batch records closed "
        "that long ago) are deleted from the job store by the active scheduler (in bounded "
        "pages between its ticks; `promptbatch purge --older-than DAYS` does it at once). 0: "
        "keep everything.")
    retention_interval_s: float = Field(
        default=300.0, gt=0, description="How often the active scheduler looks for jobs past "
        "retention_days.")
    api_stream_max_s: float = Field(
        default=600.0, gt=0, description="Longest a streamed response (chat completions with "
        "stream, GET /v1/jobs/{id}/stream) waits for a job without a deadline; a job with a "
        "deadline is waited for until then. The job keeps running after.")
    shutdown_grace_s: float = Field(
        default=120.0, ge=0, description="On SIGINT or SIGTERM a worker (and `promptbatch "
        "up`) starts no new batch and waits this long for the running ones to finish before "
        "it stops them (they then run again elsewhere). A second Ctrl-C stops at once.")
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of the Prometheus /metrics endpoint of the scheduler or the worker "
        "(0: none; the API serves /metrics on its own port). Each process on one machine "
        "needs its own (the --metrics-port option).")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the scheduler's and the worker's /metrics listen on (0.0.0.0 "
        "in a container, for Prometheus in another).")
    metrics_tenant_label: bool = Field(
        default=False,
        description="Add a tenant label to the job counters (one series per tenant: leave "
        "it off with many tenants).")
    api_metrics: bool = Field(
        default=True, description="Serve /metrics on the API's port (no authentication: "
        "keep the port internal, or turn it off).")
    flower_basic_auth: SecretStr | None = Field(
        default=None,
        description="Flower's login, 'user:password' (or PROMPTBATCH_FLOWER_BASIC_AUTH_FILE). "
        "`promptbatch flower` refuses to listen beyond loopback without it.")
    scale_horizon_s: float = Field(
        default=300.0, gt=0,
        description="promptbatch_desired_worker_slots asks for enough slots to drain the "
        "backlog within this many seconds (and to meet every pending deadline).")

    # --- Watching: learned baselines, anomalies and what they change -------------------
    anomaly_detection: bool = Field(
        default=True,
        description="The active scheduler learns baselines per deployment and replica "
        "(latency per output token, time to first token, tokens/s, error ratio, cache hit "
        "ratios, deadline pressure per class) and raises anomalies against them (README: "
        "Watching it). Off: nothing is learned, raised or acted on.")
    anomaly_actions_off: list[AnomalyKind] = Field(
        default_factory=list,
        description="Kinds of anomaly that are raised and shown but change nothing (JSON "
        "list): latency_high and throughput_low (a replica's routing weight), errors_high "
        "(fallbacks taken early), deadline_risk (the scaling signal); cache_hit_low has no "
        "action. Example: '[\"errors_high\"]'.")
    anomaly_window: int = Field(
        default=8, ge=3, le=256,
        description="Observations (batches) a judgment looks at: the median of the last this "
        "many (within anomaly_window_s) against the baseline; also the block of "
        "observations whose median and MAD teach the baseline.")
    anomaly_window_s: float = Field(
        default=30.0, gt=0,
        description="Observations older than this many seconds are not judged.")
    anomaly_min_samples: int = Field(
        default=24, ge=3,
        description="Observations a baseline needs (per signal, target and batch-size "
        "class) before anything is judged against it.")
    anomaly_sustain_s: float = Field(
        default=10.0, ge=0,
        description="A value must stay beyond its band this long to be raised as an anomaly.")
    anomaly_clear_s: float = Field(
        default=20.0, ge=0,
        description="An anomaly clears once its value stayed back inside the (narrower) "
        "clear band this long.")
    anomaly_stale_s: float = Field(
        default=300.0, gt=0,
        description="An anomaly whose target sends nothing more for this long clears (no "
        "evidence either way).")
    anomaly_latency_ratio: float = Field(
        default=2.0, gt=1,
        description="latency_high: latency per output token (or time to first token) at "
        "least this many times its baseline, and 3 robust sigmas above it.")
    anomaly_throughput_ratio: float = Field(
        default=0.5, gt=0, lt=1,
        description="throughput_low: tokens per second at most this fraction of the "
        "baseline, and 3 robust sigmas below it.")
    anomaly_error_ratio: float = Field(
        default=0.1, gt=0, le=1,
        description="errors_high: the share of requests failing transiently (5xx, 429, "
        "timeouts, resets, cut-off bodies) is at least this, and this much above the "
        "baseline's share.")
    anomaly_cache_ratio: float = Field(
        default=0.7, gt=0, lt=1,
        description="cache_hit_low: the prompt tokens served from the provider's prefix "
        "cache (or the jobs answered from the exact cache) fall to this fraction of the "
        "baseline (judged when the baseline is at least 0.1).")
    anomaly_deadline_sustain_s: float = Field(
        default=3.0, ge=0,
        description="deadline_risk: the pending work of a class must be projected past one "
        "of its deadlines (at the current worker slots) this long before it is raised.")
    anomaly_deadline_headroom: float = Field(
        default=0.25, ge=0,
        description="deadline_risk's action: desired worker slots become at least the slots "
        "that meet every pending deadline of the class, plus this fraction.")
    anomaly_probe_s: float = Field(
        default=3.0, gt=0,
        description="A replica with latency_high or throughput_low gets a batch (a probe, "
        "so that its recovery is seen) when it has none and none was sent to it for this "
        "many seconds (and four times its own batch time); otherwise only what no other "
        "replica can take.")
    anomaly_probe_share: float = Field(
        default=0.1, gt=0, le=1,
        description="The share of calls a deployment with errors_high still gets while its "
        "fallback takes the rest, so that its recovery is seen.")
    anomaly_recent_max: int = Field(
        default=200, ge=1,
        description="Cleared anomalies kept in Redis for status and the API (also dropped "
        "after retention_days).")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the environment, then ``_FILE`` secrets, then .env."""
        return (init_settings, env_settings, FileSecretsSource(settings_cls), dotenv_settings,
                file_secret_settings)

    @model_validator(mode="before")
    @classmethod
    def _store_in_data_dir(cls, data: Any) -> Any:
        """An absolute data_dir, and the default store inside it."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        folder = Path(data.get("data_dir") or default_data_dir()).expanduser().absolute()
        data["data_dir"] = folder
        if data.get("redis_sentinels"):
            data["redis_url"] = _sentinel_url(data)
        if not data.get("database_url"):
            data["database_url"] = f"sqlite:///{folder / 'promptbatch.db'}"
        return data

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        if self.task_time_limit_s >= self.visibility_timeout_s:
            raise ValueError(
                f"task_time_limit_s ({self.task_time_limit_s}) must be below "
                f"visibility_timeout_s ({self.visibility_timeout_s}), or the broker "
                "re-delivers a batch that is still running. Lower the time limit or raise "
                "the visibility timeout."
            )
        for tenant, entries in self.tenant_providers.items():
            for entry in entries:
                if entry != "*" and not entry.split("|", 1)[0]:
                    raise ValueError(f"tenant_providers[{tenant!r}]: {entry!r} is not "
                                     "'provider', 'provider|model' or '*'")
        for provider in self.provider_replicas:
            if provider not in REPLICATED_PROVIDERS:
                raise ValueError(f"provider_replicas: {provider!r} has no replicas; only "
                                 f"{', '.join(REPLICATED_PROVIDERS)} (HTTP providers) do")
        if self.broker_url and not self.broker_url.startswith(AMQP_SCHEMES):
            raise ValueError(f"broker_url: {self.broker_url.split('://')[0]!r} is not a "
                             "RabbitMQ URL (amqp://user:password@host:5672/vhost); leave it "
                             "empty to use the Redis of redis_url")
        if any(w < 0 for w in self.max_wait_ms):
            raise ValueError(f"max_wait_ms must be >= 0 for every class, got {self.max_wait_ms}")
        return self

    @model_validator(mode="after")
    def _check_money(self) -> Settings:
        for name in self.prices:
            provider, _, model = name.partition("|")
            if not provider or not model:
                raise ValueError(f"prices: {name!r} is not 'provider|model'")
        for entry in self.batch_api:
            if entry.split("|", 1)[0] not in BATCH_API_PROVIDERS:
                raise ValueError(f"batch_api: {entry!r} names a provider without a batch "
                                 f"endpoint; only {', '.join(BATCH_API_PROVIDERS)} have one "
                                 "(as 'provider' or 'provider|model')")
        if self.batch_api_poll_max_s < self.batch_api_poll_min_s:
            raise ValueError(f"batch_api_poll_max_s ({self.batch_api_poll_max_s}) must be at "
                             f"least batch_api_poll_min_s ({self.batch_api_poll_min_s})")
        return self

    def batch_api_on(self, provider: str, model: str) -> bool:
        """Whether ``provider|model`` may use its provider's batch endpoint (the more
        precise entry of ``batch_api`` wins; off when ``batch_api_enabled`` is false)."""
        if not self.batch_api_enabled or provider not in BATCH_API_PROVIDERS:
            return False
        found = self.batch_api.get(f"{provider}|{model}")
        return bool(self.batch_api.get(provider, False) if found is None else found)

    def replicas(self, provider: str) -> list[tuple[str, float, int]]:
        """The replicas of ``provider`` as ``(url, weight, cache tokens)``, or an empty
        list when it has one address (no routing)."""
        entries = self.provider_replicas.get(provider)
        if entries:
            return [(e.url.rstrip("/"), e.weight,
                     self.routing_cache_tokens if e.cache_tokens is None else e.cache_tokens)
                    for e in entries]
        base = {"openai": self.openai_base_url, "anthropic": self.anthropic_base_url}.get(
            provider, "")
        urls = [u.strip().rstrip("/") for u in base.split(",") if u.strip()]
        return [(u, 1.0, self.routing_cache_tokens) for u in urls] if len(urls) > 1 else []

    @property
    def amqp(self) -> bool:
        """Whether the batch tasks go through RabbitMQ (``broker_url``)."""
        return bool(self.broker_url)

    @property
    def wait_replicas(self) -> int:
        """Replicas a batch's start waits for (``redis_wait_replicas``, else 1 under
        Sentinel, else 0)."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if is_sentinel(self.redis_url) else 0

    def may_use(self, tenant: str, provider: str, model: str) -> tuple[bool, bool]:
        """Whether ``tenant`` may use ``provider`` at all, and ``provider|model``."""
        entries = self.tenant_providers.get(tenant, self.tenant_providers.get("*", []))
        if "*" in entries or provider in entries:
            return True, True
        return (any(e.split("|", 1)[0] == provider for e in entries),
                f"{provider}|{model}" in entries)

    def max_wait_s(self, priority: int) -> float:
        """The longest wait of class ``priority`` (0 highest), in seconds."""
        return self.max_wait_ms[priority] / 1000.0


def _secret(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def _sentinel_url(data: dict[str, Any]) -> str:
    """The ``redis+sentinel://`` URL of the Sentinel settings in ``data`` (a plain
    redis_url beside them is refused: which one would be meant?)."""
    url = str(data.get("redis_url") or "")
    if url and not is_sentinel(url):
        raise ValueError("PROMPTBATCH_REDIS_URL and PROMPTBATCH_REDIS_SENTINELS are both set: "
                         "unset PROMPTBATCH_REDIS_URL to find the primary through Sentinel")
    master = str(data.get("redis_sentinel_master") or "")
    if not master:
        raise ValueError("PROMPTBATCH_REDIS_SENTINELS is set but PROMPTBATCH_REDIS_SENTINEL_"
                         "MASTER is not: set it to the name the sentinels monitor")
    sentinels = parse_sentinels(str(data["redis_sentinels"]))
    return SentinelAddress(sentinels, master, password=_secret(data.get("redis_password")),
                           sentinel_password=_secret(data.get("redis_sentinel_password"))).url()

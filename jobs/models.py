"""The job types every component shares: request, spec, states, results.

``JobRequest`` is what a producer sends, validated at the edge. ``JobSpec`` is the
resolved request (defaults filled in, deadline absolute, id and tenant assigned): it is
what crosses Redis as JSON and what the scheduler and workers read. ``JobResult`` is the
one final outcome of a job.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

from config.settings import PRIORITY_NAMES
from jobs.chat import (
    FinishReason,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
    canonical,
    check_tool_answers,
    raise_at,
)

__all__ = ["FINAL_STATES", "CachePolicy", "GenerationParams", "IntakeEntry", "JobRequest",
           "JobResult", "JobSpec", "JobState", "Message", "Priority", "PriorityField",
           "Usage"]


class Priority(IntEnum):
    """Priority classes; a lower number is more urgent. Each class has its own queue."""

    CRITICAL = 0  #: interactive and user-facing; never waits for companions
    HIGH = 1  #: interactive, may wait a few milliseconds
    NORMAL = 2  #: the default for backend services
    LOW = 3  #: background work
    BULK = 4  #: offline bulk jobs; waits longest for the best batches

    @property
    def label(self) -> str:
        """The lower-case class name (``"critical"``...)."""
        return PRIORITY_NAMES[self.value]


class JobState(StrEnum):
    """Where a job is in its life. The last four are final: a job reaches exactly one."""

    QUEUED = "QUEUED"  #: accepted and waiting in the scheduler's pool
    SCHEDULED = "SCHEDULED"  #: placed in a batch that was sent to the workers
    RUNNING = "RUNNING"  #: a worker is calling the provider
    #: in a provider's batch endpoint (the half-price lane), waiting for its result (up to
    #: the provider's completion window)
    AT_PROVIDER = "AT_PROVIDER"
    SUCCEEDED = "SUCCEEDED"  #: the provider answered; the result holds the text
    FAILED = "FAILED"  #: the provider refused or kept failing; the result holds the reason
    EXPIRED = "EXPIRED"  #: the deadline passed before the job could run
    CANCELLED = "CANCELLED"  #: cancelled before it ran

    @property
    def final(self) -> bool:
        """Whether this state ends the job."""
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.EXPIRED,
                          JobState.CANCELLED})


def _parse_priority(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a class name or an integer 0-4, not a boolean")
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITY_NAMES:
            return Priority(PRIORITY_NAMES.index(name))
        shown = repr(value) if len(value) <= 40 else f"{value[:40]!r}..."
        raise ValueError(f"unknown priority {shown}; use one of {', '.join(PRIORITY_NAMES)} "
                         "or 0-4 (0 highest)")
    if isinstance(value, int):
        if 0 <= value < len(PRIORITY_NAMES):
            return Priority(value)
        shown = str(value) if -1000 < value < 1000 else "a number"
        raise ValueError(f"priority {shown} is out of range; use 0 (critical) to 4 (bulk)")
    raise ValueError("must be a class name (critical, high, normal, low, bulk) or an integer 0-4")


PriorityField = Annotated[Priority, BeforeValidator(_parse_priority)]

#: How a job reaches its provider: ``auto`` (the scheduler decides), ``fast`` (a live call),
#: ``provider_batch`` (the provider's own batch endpoint, at its discount).
Lane = Literal["auto", "fast", "provider_batch"]

#: How a job uses the result cache: ``auto`` (only a deterministic request: temperature 0
#: or a seed), ``off``, ``exact`` (any request, the user accepts a stored answer),
#: ``semantic`` (also a similar enough earlier prompt; see ``jobs.cachekey``).
CachePolicy = Literal["auto", "off", "exact", "semantic"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class GenerationParams(BaseModel):
    """Generation parameters passed to the provider. Jobs share a batch only if equal."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=4
    )
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    #: Return the log probabilities of the answer's tokens (providers that serve them).
    logprobs: bool | None = None
    #: With ``logprobs``: how many most likely tokens to list at each position (0-20).
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> GenerationParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    def canonical(self) -> str:
        """A stable JSON string of the set parameters, in the fields' order (part of the
        compatibility key, which the scheduler computes for every job it admits)."""
        return self.model_dump_json(exclude_none=True)


MetadataValue = str | int | float | bool | None


def _scalar(value: Any) -> MetadataValue:
    if value is None or isinstance(value, str | bool | int):
        if isinstance(value, str) and len(value) > 4096:
            raise ValueError("a metadata string may have at most 4096 characters")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError("a metadata integer must fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    raise ValueError("must be a string, a number, a boolean or null")


MetadataScalar = Annotated[Any, AfterValidator(_scalar)]


class JobRequest(BaseModel):
    """A prompt as a producer submits it. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=400_000)

    prompt: str | None = Field(default=None, description="The prompt text, or use messages.")
    messages: list[Message] | None = Field(
        default=None, min_length=1, max_length=1_000, description="Chat messages, or use prompt."
    )
    priority: PriorityField = Field(default=Priority.NORMAL)
    deadline: AwareDatetime | None = Field(
        default=None, description="Latest time the job may start; timezone required."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=365 * 24 * 3600, description="Deadline relative to submission."
    )
    provider: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=128)
    params: GenerationParams = Field(default_factory=GenerationParams)
    tenant: str | None = Field(default=None, max_length=64)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    client_id: str | None = Field(
        default=None, min_length=1, max_length=255,
        validation_alias=AliasChoices("client_id", "id"),
        description="Your own id for the job (also accepted as `id`, as a JSONL line names "
        "it); `promptbatch status` and `GET /v1/jobs/{id}` find the job by it too.")
    metadata: dict[Annotated[str, Field(max_length=64)], MetadataScalar] = Field(
        default_factory=dict, max_length=64
    )
    stream: bool = Field(
        default=False, description="Stream the output as the provider produces it "
        "(GET /v1/jobs/{id}/stream); the result is the whole text as usual.")
    cache: CachePolicy = Field(
        default="auto", description="Result cache: 'auto' (deterministic requests only: "
        "temperature 0 or a seed), 'off', 'exact' (any request), 'semantic' (also a similar "
        "enough earlier prompt, when the tenant allows it).")
    response_format: ResponseFormat | None = Field(
        default=None, description="The answer's shape, as OpenAI takes it: {'type': 'text'}, "
        "{'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name', 'schema', "
        "'strict'}}. A JSON answer is checked (and asked again once) before the job succeeds.")
    tools: list[Tool] | None = Field(
        default=None, min_length=1, max_length=128,
        description="Functions the model may call (OpenAI's function tools).")
    tool_choice: ToolChoice | None = Field(
        default=None, description="'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}.")
    parallel_tool_calls: bool | None = Field(
        default=None, description="Whether the model may call several tools in one answer.")
    lane: Lane = Field(
        default="auto", description="How the job reaches its provider: 'auto' (the scheduler "
        "decides: bulk work that can wait goes through the provider's half-price batch "
        "endpoint where the deployment has one), 'fast' (a live call), 'provider_batch' "
        "(the provider's batch endpoint).")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("prompt is empty or only whitespace")
        return value

    @field_validator("messages")
    @classmethod
    def _messages_not_blank(cls, value: list[Message] | None) -> list[Message] | None:
        if value is not None and not any(m.text.strip() or m.images or m.tool_calls
                                         for m in value):
            raise ValueError("every message is empty or only whitespace")
        return value

    @field_validator("provider", "model")
    @classmethod
    def _name_shape(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("must be 1-128 letters, digits or ._:/@+- and start with a letter "
                             "or digit")
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant_shape(cls, value: str | None) -> str | None:
        if value is not None and not _TENANT.match(value):
            raise ValueError("must be 1-64 letters, digits or ._- and start with a letter or digit")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_own_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "id" in data and "client_id" in data \
                and data["id"] != data["client_id"]:
            raise ValueError("give your own id as 'id' or as 'client_id', not both")
        return data

    @model_validator(mode="after")
    def _one_prompt_one_deadline(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.deadline is not None and self.timeout_s is not None:
            raise ValueError("give at most one of 'deadline' or 'timeout_s'")
        return self

    @model_validator(mode="after")
    def _tools_consistent(self) -> JobRequest:
        errors = check_tool_answers(self.messages or [])
        if self.tool_choice is not None and self.tools is None and self.tool_choice != "none":
            errors.append(("tool_choice", "needs tools"))
        if self.parallel_tool_calls is not None and self.tools is None:
            errors.append(("parallel_tool_calls", "needs tools"))
        if not isinstance(self.tool_choice, str | None):
            names = [t.function.name for t in self.tools or ()]
            if self.tool_choice.function.name not in names:
                errors.append(("tool_choice.function.name",
                               f"{self.tool_choice.function.name!r} is not one of the tools "
                               f"({', '.join(names)})"))
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            errors.append(("tools", "two tools have the same name"))
        raise_at("JobRequest", errors)
        return self


class JobSpec(BaseModel):
    """A resolved, accepted job: what crosses Redis and what workers run."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    priority: Priority
    created_at: float = Field(description="Unix time of acceptance.")
    deadline: float | None = Field(default=None, description="Unix time; None: no deadline.")
    provider: str
    model: str
    params: GenerationParams = Field(default_factory=GenerationParams)
    prompt: str | None = None
    messages: list[Message] | None = None
    idempotency_key: str | None = None
    client_id: str | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    cache: CachePolicy = "auto"
    stream: bool = False
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    lane: Lane = "auto"
    #: A digest of the request as submitted, for a job with an idempotency key: a repeat
    #: of the key must carry the same request.
    request_hash: str | None = None

    @property
    def compat_key(self) -> str:
        """Jobs share a batch only when these are equal: provider, model, parameters and,
        when set, a digest of the response format and the tools (a provider takes one of
        each per call)."""
        key = f"{self.provider}|{self.model}|{self.params.canonical()}"
        shape = self.shape_key
        return f"{key}|{shape}" if shape else key

    @property
    def shape_key(self) -> str:
        """A digest of what shapes the answer (response format, tools, tool choice,
        parallel tool calls); '' when none is set."""
        parts = (canonical(self.response_format), canonical(self.tools),
                 canonical(self.tool_choice),
                 "" if self.parallel_tool_calls is None else str(self.parallel_tool_calls))
        if not any(parts):
            return ""
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    @property
    def text(self) -> str:
        """The prompt as one string (chat messages as ``role: text`` lines, images and
        tool calls marked: ``Message.rendered``). What similarity is computed from."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m.rendered() for m in self.messages or ())


class Usage(BaseModel):
    """Token usage, reported as OpenAI does."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Prompt tokens read from the provider's prompt cache (part of ``prompt_tokens``).
    cached_tokens: int = 0
    #: Prompt tokens written to the provider's prompt cache (part of ``prompt_tokens``;
    #: Anthropic bills them apart).
    cache_write_tokens: int = 0
    #: What the job cost, in US dollars, by the deployment's price (None: no price known).
    cost_usd: float | None = None
    #: What the job did not pay, in US dollars: by the cache or coalescing (its own call's
    #: cost), prompt-cache reads and the batch discount (None: no price known).
    saved_usd: float | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class JobResult(BaseModel):
    """The one final outcome of a job.

    A SUCCEEDED job's answer is the message as the provider gave it: ``text`` (its
    content), ``tool_calls``, ``refusal``, ``finish_reason``, ``logprobs`` when asked, and
    for a JSON response format the ``parsed`` value (validated against the schema). A job
    FAILED for its answer (``error_code`` ``invalid_output``) keeps the raw answer in
    ``text``.
    """

    id: str
    state: JobState
    text: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = Field(
        default=None, description="OpenAI's choice.logprobs object, when asked.")
    parsed: Any = Field(default=None, description="The answer as JSON, for a json_object or "
                        "json_schema response format (it validates against the schema).")
    error_code: str | None = Field(
        default=None, description="What kind of failure: 'invalid_output' (the answer did "
        "not validate, after the retries), else None.")
    schema_retries: int | None = Field(
        default=None, description="For a job with a JSON response format or tools: how "
        "many times its answer was asked again because it did not validate (0: valid at "
        "the first answer). None when nothing was checked.")
    usage: Usage | None = None
    error: str | None = None
    provider: str | None = None
    model: str | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    batch_similarity: float | None = None
    attempts: int | None = None
    created_at: float | None = None
    deadline: float | None = Field(default=None, description="The job's deadline, Unix time.")
    started_at: float | None = None
    finished_at: float = Field(default_factory=lambda: datetime.now(UTC).timestamp())
    cache: Literal["exact", "semantic", "coalesced"] | None = Field(
        default=None, description="Where the answer came from when no provider was called "
        "for this job: a cached result, or the call of an identical job in flight.")
    cache_source: str | None = Field(default=None, description="The job whose answer it is.")
    cache_similarity: float | None = Field(
        default=None, description="Cosine similarity to the source's prompt (semantic hits).")
    lane: Literal["fast", "provider_batch"] | None = Field(
        default=None, description="How the answer came: a live call ('fast') or the "
        "provider's batch endpoint ('provider_batch', at its batch discount).")

    @property
    def missed_deadline(self) -> bool:
        """Whether the job missed its deadline: expired, or finished after it."""
        return self.state is JobState.EXPIRED or (
            self.deadline is not None and self.finished_at > self.deadline)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def queued_ms(self) -> float | None:
        """Time from acceptance to the provider call, in milliseconds."""
        if self.created_at is None or self.started_at is None:
            return None
        return (self.started_at - self.created_at) * 1000.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def latency_ms(self) -> float | None:
        """Time from acceptance to the final state, in milliseconds."""
        if self.created_at is None:
            return None
        return (self.finished_at - self.created_at) * 1000.0

    def public(self) -> dict[str, Any]:
        """The result as callers see it (JSON-ready, with the derived timings)."""
        return self.model_dump(mode="json")

    def answer(self) -> dict[str, Any]:
        """The answer's fields besides ``text`` (tool calls, refusal, finish reason,
        logprobs, parsed value), JSON-ready, for a job answered with this one's answer
        (the cache, a coalesced call): ``schema_retries`` is 0 there when it was checked
        (that job was not asked again)."""
        out = self.model_dump(mode="json", include={"tool_calls", "refusal", "finish_reason",
                                                    "logprobs", "parsed"}, exclude_none=True)
        if self.schema_retries is not None:
            out["schema_retries"] = 0
        return out


@dataclass(frozen=True, slots=True)
class IntakeEntry:
    """One job read from the intake stream: its id, class, tenant and deadline."""

    sid: str
    job_id: str
    priority: int = 2
    tenant: str = ""
    deadline: float | None = None

    @property
    def arrived(self) -> float:
        """When the entry was added to intake (the stream id's milliseconds), Unix time."""
        return int(self.sid.split("-", 1)[0]) / 1000.0

    @classmethod
    def parse(cls, sid: str, fields: dict[str, str]) -> IntakeEntry:
        """The entry of a stream item."""
        d = fields.get("d")
        return cls(sid, fields["id"], int(fields.get("p", 2)), fields.get("t", ""),
                   float(d) if d else None)

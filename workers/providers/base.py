"""The provider protocol: a batch of requests in, one reply per request out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from jobs.chat import FinishReason, ResponseFormat, Tool, ToolCall, ToolChoice
from jobs.models import GenerationParams, JobSpec, Message, Usage

if TYPE_CHECKING:
    from jobs.streams import Sink


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One job as a provider sees it."""

    job_id: str
    model: str
    params: GenerationParams
    prompt: str | None
    messages: tuple[Message, ...] | None
    deadline: float | None
    text: str
    #: Characters at the start of ``text`` that other pending jobs share (the scheduler's
    #: hint): worth marking for the provider's prompt cache even when sent alone.
    pending_prefix_chars: int = 0
    #: Whether the job's output is streamed (the provider hands its chunks to its sink).
    stream: bool = False
    #: The answer's shape (OpenAI's ``response_format``), when the job asks for one.
    response_format: ResponseFormat | None = None
    #: Functions the model may call, and how (OpenAI's ``tools``, ``tool_choice``,
    #: ``parallel_tool_calls``).
    tools: tuple[Tool, ...] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @classmethod
    def from_spec(cls, spec: JobSpec, pending_prefix_chars: int = 0) -> ProviderRequest:
        """The request of an accepted job."""
        return cls(job_id=spec.id, model=spec.model, params=spec.params, prompt=spec.prompt,
                   messages=tuple(spec.messages) if spec.messages is not None else None,
                   deadline=spec.deadline, text=spec.text,
                   pending_prefix_chars=pending_prefix_chars, stream=spec.stream,
                   response_format=spec.response_format,
                   tools=tuple(spec.tools) if spec.tools is not None else None,
                   tool_choice=spec.tool_choice, parallel_tool_calls=spec.parallel_tool_calls)


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """The provider's answer to one request: text and usage, or an error.

    An error is ``transient`` when trying again later may succeed (429, 529, 5xx,
    timeouts, resets, a 200 whose body is cut off or not JSON), with the server's
    ``retry_after`` seconds when it gave one; otherwise it is final. A final error belongs
    to the job (context too long, another 4xx, an answer without content) unless
    ``whole_request``: the refused request carried several jobs, so the error is not any
    one job's (the retry layer splits the request until the culprit is alone). Providers
    never retry: ``workers.retry`` is the one layer.
    """

    job_id: str
    text: str | None = None
    usage: Usage | None = None
    error: str | None = None
    #: The answer's tool calls, refusal, why it stopped and its log probabilities (OpenAI's
    #: ``choice.logprobs``), as the provider gave them.
    tool_calls: tuple[ToolCall, ...] | None = None
    refusal: str | None = None
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = None
    #: Set where the worker checks the answer (``workers.promise``): the content parsed as
    #: JSON (a JSON response format), and the kind of a failure of the answer itself
    #: (``invalid_output``).
    parsed: Any = None
    error_code: str | None = None
    transient: bool = False
    retry_after: float | None = None
    whole_request: bool = False

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None


class Provider(Protocol):
    """Sends a batch to an LLM service. Implementations: echo, simulated, openai, anthropic.

    ``probe_first``: a remote service, which may be down: while a deployment has no recent
    success, the retry layer sends one request of a batch first and the rest only once
    it answered. ``streams``: it can stream a reply as it is generated; the worker then
    gives it a ``sink`` (``jobs.streams.Sink``) that it writes each streamed job's chunks
    to. Adding a provider: a module with a class of this shape, and a line in
    ``workers.providers.create_provider``.
    """

    name: str
    probe_first: bool
    streams: bool
    sink: Sink | None

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        """One reply per request, in the order given."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

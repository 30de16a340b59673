"""The provider protocol: a batch of requests in, one reply per request out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from jobs.models import GenerationParams, JobSpec, Message, Usage


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

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ProviderRequest:
        """The request of an accepted job."""
        return cls(job_id=spec.id, model=spec.model, params=spec.params, prompt=spec.prompt,
                   messages=tuple(spec.messages) if spec.messages is not None else None,
                   deadline=spec.deadline, text=spec.text)


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """The provider's answer to one request: text and usage, or an error.

    An error is ``transient`` when trying again later may succeed (429, 529, 5xx,
    timeouts, resets), with the server's ``retry_after`` seconds when it gave one;
    otherwise it belongs to the job (context too long, another 4xx, a malformed
    response) and is final. Providers never retry: ``workers.retry`` is the one layer.
    """

    job_id: str
    text: str | None = None
    usage: Usage | None = None
    error: str | None = None
    transient: bool = False
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None


class Provider(Protocol):
    """Sends a batch to an LLM service. Implementations: echo, simulated, openai, anthropic."""

    name: str

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        """One reply per request, in the order given."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

"""Which lane a job takes to its provider: the fast path (a live call, in a batch of the
scheduler's) or the provider's own batch endpoint (the half-price lane: OpenAI's Batch
API, Anthropic's Message Batches), and what those endpoints take.

The rules, in order:

1. A job that asks ``lane: "fast"``, or streams, takes the fast path.
2. A deployment without a batch endpoint enabled (``Settings.batch_api``, and
   ``batch_api_enabled``) sends everything on the fast path (a job that asked
   ``lane: "provider_batch"`` is refused at submit, naming ``lane``; one accepted before
   the settings changed goes fast).
3. A job that asks ``lane: "provider_batch"`` goes to a provider batch.
4. A ``bulk`` job goes to a provider batch when it has no deadline, or when its deadline
   leaves the provider's completion window (24 h) plus ``batch_api_margin_s`` plus the
   time it may wait for others to join its batch (``wait_s``).
5. Everything else takes the fast path.

Pure: settings and the clock are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from config.settings import Settings
from jobs.models import JobSpec, Priority

#: A job's lane once chosen.
Chosen = Literal["fast", "provider_batch"]

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a provider's batch endpoint takes: most requests and bytes in one batch, and
    the completion window it promises."""

    provider: str
    max_requests: int
    max_bytes: int
    window_s: float = 24 * 3600.0


#: The providers' own limits (OpenAI: 50,000 requests or 200 MB an input file; Anthropic:
#: 100,000 requests or 256 MB a batch); both complete within 24 hours.
ENDPOINTS: dict[str, Endpoint] = {
    "openai": Endpoint("openai", 50_000, 200 * MB),
    "anthropic": Endpoint("anthropic", 100_000, 256 * MB),
}


def endpoint(settings: Settings, provider: str, model: str) -> Endpoint | None:
    """The batch endpoint ``provider|model`` may use (with ``batch_api_max_requests``
    applied), or None."""
    if not settings.batch_api_on(provider, model):
        return None
    found = ENDPOINTS[provider]
    cap = settings.batch_api_max_requests
    return replace(found, max_requests=min(found.max_requests, cap)) if cap else found


def wait_s(settings: Settings) -> float:
    """Longest a job waits for others to join its provider batch."""
    if settings.batch_api_wait_s is not None:
        return settings.batch_api_wait_s
    return settings.max_wait_s(int(Priority.BULK))


def choose(spec: JobSpec, settings: Settings, now: float) -> Chosen:
    """The lane of an accepted job, by the rules of the module."""
    if spec.lane == "fast" or spec.stream:
        return "fast"
    found = endpoint(settings, spec.provider, spec.model)
    if found is None:
        return "fast"
    if spec.lane == "provider_batch":
        return "provider_batch"
    if spec.priority != Priority.BULK:
        return "fast"
    if spec.deadline is None:
        return "provider_batch"
    need = found.window_s + settings.batch_api_margin_s + wait_s(settings)
    return "provider_batch" if spec.deadline - now >= need else "fast"


def refusal(provider: str, model: str, lane: str, stream: bool,
            settings: Settings) -> tuple[str, str] | None:
    """``("lane", why)`` for a job that asks for a provider batch it cannot have, else
    None."""
    if lane != "provider_batch":
        return None
    if stream:
        return ("lane", "a provider batch does not stream: leave stream out, or use lane "
                "'auto' or 'fast'")
    if endpoint(settings, provider, model) is None:
        if not settings.batch_api_enabled:
            why = "the batch lane is turned off here (batch_api_enabled)"
        elif provider not in ENDPOINTS:
            why = (f"provider {provider!r} has no batch endpoint (only "
                   f"{', '.join(ENDPOINTS)} do)")
        else:
            why = (f"{provider}|{model} does not use its provider's batch endpoint here: set "
                   f"PROMPTBATCH_BATCH_API='{{\"{provider}|{model}\": true}}'")
        return ("lane", f"{why}; or use lane 'auto' or 'fast'")
    return None

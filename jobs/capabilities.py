"""What each provider serves of a request: a job asking for something its provider cannot
serve is refused at submit, by field, never sent with the field dropped.

``echo`` and ``simulated`` serve everything (they answer in kind). ``openai`` passes every
field through to an OpenAI-compatible server. ``anthropic`` follows Anthropic's Messages
API: it has no log probabilities, no ``seed``, no presence or frequency penalty, and a
``temperature`` of at most 1; it takes at most 100 images a request and 5 MiB an inline
image. The deployment's own bound on an inline image (the ``max_image_bytes`` setting,
5 MiB by default) applies to every provider, checked here with the provider's.
Response formats, tools, ``tool_choice`` (``none`` included), ``parallel_tool_calls``,
``top_p``, ``stop`` and image URLs are served by all four (the
Anthropic provider translates them). An image's ``detail`` has no Anthropic equivalent: it
counts for estimates only.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobs.chat import IMAGE_TYPES, Message, image_too_large, mib
from jobs.models import GenerationParams


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider serves. ``None``: no bound of its own (the request's apply)."""

    #: ``logprobs`` and ``top_logprobs``.
    logprobs: bool = True
    #: ``seed``.
    seed: bool = True
    #: ``presence_penalty`` and ``frequency_penalty``.
    penalties: bool = True
    #: The highest ``temperature`` it takes.
    max_temperature: float = 2.0
    #: Most images in one request.
    max_images: int | None = None
    #: Largest inline (``data:``) image, decoded.
    max_image_bytes: int | None = None


#: Everything served (no check to run).
EVERYTHING = Capabilities()
#: The table, by provider name (a provider missing here serves everything).
CAPABILITIES: dict[str, Capabilities] = {
    "echo": EVERYTHING,
    "simulated": EVERYTHING,
    "openai": EVERYTHING,
    "anthropic": Capabilities(logprobs=False, seed=False, penalties=False,
                              max_temperature=1.0, max_images=100,
                              max_image_bytes=5 * 1024 * 1024),
}


def _params(provider: str, caps: Capabilities,
            params: GenerationParams) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if not caps.logprobs:
        errors += [(f"params.{name}", f"the {provider} provider does not return log "
                    "probabilities; leave it out or use a provider that does (openai)")
                   for name in ("logprobs", "top_logprobs")
                   if getattr(params, name) not in (None, False)]
    if not caps.seed and params.seed is not None:
        errors.append(("params.seed", f"the {provider} provider takes no seed; leave it "
                       "out (temperature 0 keeps the request cacheable)"))
    if not caps.penalties:
        errors += [(f"params.{name}", f"the {provider} provider has no {name}; leave it out")
                   for name in ("presence_penalty", "frequency_penalty")
                   if getattr(params, name) is not None]
    if params.temperature is not None and params.temperature > caps.max_temperature:
        errors.append(("params.temperature", f"the {provider} provider takes a temperature "
                       f"of at most {caps.max_temperature:g}"))
    return errors


def _images(provider: str, caps: Capabilities, messages: Sequence[Message],
            limit: int | None) -> list[tuple[str, str]]:
    """One error per inline image over ``limit`` (the deployment's bound) or over the
    provider's, and one if there are more images than the provider takes."""
    errors: list[tuple[str, str]] = []
    count = 0
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            if part.image_url is None:
                continue
            count += 1
            size = part.image_url.size
            field = f"messages.{i}.content.{j}.image_url.url"
            if limit is not None and size > limit:
                errors.append((field, image_too_large(size, limit)))
            elif caps.max_image_bytes is not None and size > caps.max_image_bytes:
                errors.append((field, f"the image has {size} bytes; the {provider} provider "
                               f"takes at most {mib(caps.max_image_bytes)} MiB an image "
                               f"({', '.join(IMAGE_TYPES)}): send a smaller image"))
    if caps.max_images is not None and count > caps.max_images:
        errors.append(("messages", f"{count} images; the {provider} provider takes at most "
                       f"{caps.max_images} in one request"))
    return errors


def unserved(provider: str, params: GenerationParams, messages: Sequence[Message] | None,
             max_image_bytes: int | None = None) -> list[tuple[str, str]]:
    """``(field, message)`` for each thing the request asks that ``provider`` cannot
    serve (fields named as in ``JobRequest``); empty when it serves it all.
    ``max_image_bytes``: the deployment's bound on an inline image (the setting), checked
    with the provider's own."""
    caps = CAPABILITIES.get(provider, EVERYTHING)
    if caps is EVERYTHING and max_image_bytes is None:
        return []
    return _params(provider, caps, params) + _images(provider, caps, messages or (),
                                                     max_image_bytes)


def serves(provider: str, params: GenerationParams,
           messages: Sequence[Message] | None) -> bool:
    """Whether ``provider`` serves the request (a fallback is chosen only if it does)."""
    return not unserved(provider, params, messages)

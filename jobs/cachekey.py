"""What makes two requests the same, for the result cache: pure functions, no Redis.

The exact key is a hash of the canonical request inside its partition: the tenant (or
the shared partition a tenant opts into), the provider, the model and its version, every
generation parameter that changes the output (log probabilities included), the full
messages (the system prompt, tool calls and tool results included; an image by its
digest), and the response format, tools, tool choice and ``parallel_tool_calls``. Only a
deterministic request is cached unless the job asks otherwise; a job with tools or a
response format is no exception (its key holds them, and the whole conversation).

The semantic guard: a similar prompt is not the same question when the two disagree on a
number, a negation, a polar word (enable / disable), a quoted string or a capitalised
name; embeddings score such pairs high, so a semantic hit must pass this too.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import orjson

from config.settings import Settings
from jobs.chat import Message, canonical
from jobs.models import JobSpec

#: The partition of tenants that share their cache.
SHARED = "_shared"


def deterministic(spec: JobSpec) -> bool:
    """Whether the provider should answer the same again: temperature 0, or a seed."""
    return spec.params.temperature == 0 or spec.params.seed is not None


def cacheable(spec: JobSpec, settings: Settings) -> bool:
    """Whether the job may take its answer from the cache (and give its own to it)."""
    if not settings.cache_enabled or spec.cache == "off":
        return False
    return spec.cache in ("exact", "semantic") or deterministic(spec)


def semantic_allowed(spec: JobSpec, settings: Settings) -> bool:
    """Whether the job may be answered by a similar (not identical) earlier prompt."""
    allowed = settings.cache_semantic_tenants
    return spec.cache == "semantic" and ("*" in allowed or spec.tenant in allowed)


def partition(spec: JobSpec, settings: Settings) -> str:
    """``tenant|provider|model|version``: entries of one partition serve each other."""
    deployment = f"{spec.provider}|{spec.model}"
    owner = SHARED if spec.tenant in settings.cache_shared_tenants else spec.tenant
    return f"{owner}|{deployment}|{settings.cache_model_versions.get(deployment, '')}"


def _message(m: Message) -> dict[str, Any]:
    """A message as a key holds it: an image by its digest, never its bytes."""
    data = m.model_dump(mode="json", exclude_none=True)
    if m.images and isinstance(m.content, list):
        data["content"] = [
            {"type": "image_url", "image_url": {"digest": p.image_url.digest,
                                                "detail": p.image_url.detail}}
            if p.image_url is not None else p.model_dump(mode="json", exclude_none=True)
            for p in m.content]
    return data


def request_body(spec: JobSpec) -> str:
    """The canonical request: parameters, the whole conversation (system prompt, tool calls
    and results, images by digest) and, when set, the response format, the tools, the tool
    choice and ``parallel_tool_calls``: everything that changes the answer."""
    messages = ([{"role": "user", "content": spec.prompt}] if spec.prompt is not None
                else [_message(m) for m in spec.messages or ()])
    body: dict[str, Any] = {"params": spec.params.model_dump(mode="json", exclude_none=True),
                            "messages": messages}
    if spec.shape_key:  # left out when unset: the keys of plain requests stay as they were
        body["shape"] = [canonical(spec.response_format), canonical(spec.tools),
                         canonical(spec.tool_choice), spec.parallel_tool_calls]
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()


def exact_key(spec: JobSpec, settings: Settings) -> str:
    """``partition:sha256`` of the request: equal only for the same output request."""
    part = partition(spec, settings)
    digest = hashlib.sha256(f"{part}\n{request_body(spec)}".encode()).hexdigest()
    return f"{part}:{digest}"


def semantic_partition(spec: JobSpec, settings: Settings) -> str:
    """The FAISS index a semantic lookup searches: the exact partition plus the
    parameters and the system prompt (only the last user turn may differ) and, when set,
    what shapes the answer (``JobSpec.shape_key``: response format, tools, tool choice)
    and the images by digest. A job with tools, a response format or images so is only
    ever answered by a similar job that had the same ones."""
    system = [m.text for m in spec.messages or () if m.role in ("system", "developer")]
    same: list[Any] = [spec.params.model_dump(mode="json", exclude_none=True), system]
    images = [img.digest for m in spec.messages or () for img in m.images]
    if spec.shape_key or images:  # left out when unset: plain partitions stay as they were
        same += [spec.shape_key, images]
    extra = hashlib.sha256(json.dumps(same).encode()).hexdigest()
    return f"{partition(spec, settings)}:{extra[:16]}"


def semantic_text(spec: JobSpec) -> str:
    """What a semantic lookup compares: the conversation without its system prompt (an
    assistant's tool calls as ``name(arguments)``, so that the guard sees their numbers
    and names)."""
    if spec.prompt is not None:
        return spec.prompt
    return "\n".join(_said(m) for m in spec.messages or ()
                     if m.role not in ("system", "developer"))


def _said(m: Message) -> str:
    if not m.tool_calls:
        return m.text
    calls = " ".join(f"{c.function.name}({c.function.arguments})" for c in m.tool_calls)
    return f"{m.text} {calls}" if m.text else calls


# --- the semantic guard -------------------------------------------------------------------

_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_QUOTED = re.compile(r"\"([^\"]+)\"|'([^']{2,})'|`([^`]+)`|“([^”]+)”")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_NEGATIONS = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor",
    "without", "cannot", "cant", "can't", "don't", "dont", "doesn't", "doesnt", "didn't",
    "isn't", "isnt", "aren't", "wasn't", "weren't", "won't", "wouldn't", "shouldn't",
    "couldn't", "mustn't", "hasn't", "haven't", "hadn't", "except", "excluding", "unless"})
#: Words whose opposite changes the question; each side is its own class.
_POLAR: dict[str, str] = {}
for _pair in ("enable disable", "enabled disabled", "allow deny", "allow block",
              "include exclude", "increase decrease", "add remove", "start stop",
              "open close", "before after", "above below", "more less", "most least",
              "maximum minimum", "max min", "true false", "yes no",
              "accept reject", "lock unlock", "encrypt decrypt", "buy sell",
              "import export", "win lose", "positive negative", "ascending descending",
              "first last", "higher lower", "larger smaller", "bigger smaller",
              "faster slower", "better worse", "best worst", "install uninstall",
              "upload download", "subscribe unsubscribe", "connect disconnect",
              "grant revoke", "love hate", "like dislike", "agree disagree", "always never",
              "increase reduce", "valid invalid", "legal illegal", "safe unsafe",
              "pros cons", "advantages disadvantages", "north south", "east west",
              "left right", "old new", "older newer", "cheap expensive", "hot cold",
              "morning evening", "male female", "inside outside", "import export",
              "send receive", "push pull", "read write", "input output", "sync async"):
    _a, _b = _pair.split()
    _POLAR.setdefault(_a, _a)
    _POLAR.setdefault(_b, _b)
#: "on" is mostly a preposition; its opposite alone marks "turn on" vs "turn off".
_POLAR["off"] = "off"


def _signature(text: str) -> tuple[tuple[str, ...], frozenset[str], frozenset[str],
                                   frozenset[str], frozenset[str]]:
    numbers = tuple(_NUMBER.findall(text))
    quoted = frozenset(next(g for g in m if g).strip().lower() for m in _QUOTED.findall(text))
    found = list(_WORD.finditer(text))
    lowered = [m.group().lower() for m in found]
    negations = frozenset(w for w in lowered if w in _NEGATIONS or w.endswith("n't"))
    polar = frozenset(_POLAR[w] for w in lowered if w in _POLAR)
    names: set[str] = set()
    for m in found:
        w = m.group()
        before = text[:m.start()]
        starts_sentence = not before.strip() or re.search(r"[.!?:\n]\s*$", before)
        if (w[0].isupper() and not starts_sentence) or (len(w) > 1 and w.isupper()):
            names.add(w.lower())  # a name, or an acronym anywhere (SQL, AWS)
    return numbers, quoted, negations, polar, frozenset(names)


def guard(a: str, b: str) -> str | None:
    """None if ``a`` and ``b`` may be the same question; else what differs (numbers,
    negation, polar word, quoted text or names)."""
    sa, sb = _signature(a), _signature(b)
    for what, x, y in zip(("numbers", "negation", "quoted text", "polar word", "names"),
                          (sa[0], sa[2], sa[1], sa[3], sa[4]),
                          (sb[0], sb[2], sb[1], sb[3], sb[4]), strict=True):
        if x != y:
            return what
    return None

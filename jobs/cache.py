"""The result cache and the coalescing of identical requests (Redis side; keys in
``jobs.cachekey``).

* At submit, a cacheable job whose exact key has an entry ends SUCCEEDED at once with
  the cached answer (``cache: "exact"``, ``cache_source``: the job it came from); nothing
  reaches the scheduler or a worker.
* A cacheable job that misses while an identical one is pending or running *follows* it
  (Redis state FOLLOWING, not in intake): when the leader succeeds, each follower ends
  SUCCEEDED with its answer (``cache: "coalesced"``); when it fails, expires or is
  cancelled, the followers are published and run on their own. A follower can be
  cancelled alone.
* A worker stores every SUCCEEDED result of a cacheable job (``put``). Failed, expired
  and cancelled results are never stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from config.settings import Settings
from jobs import cachekey
from jobs.costs import hit_usage
from jobs.models import JobResult, JobSpec, JobState, Usage
from jobs.prices import PriceBook
from jobs.queue import RedisQueue

#: Records results: (results, tenants, classes) -> ids stored.
Recorder = Callable[[list[JobResult], list[str], list[int]], set[str]]


@dataclass(frozen=True)
class Entry:
    """A cached answer."""

    text: str | None
    usage: Usage | None
    source: str
    provider: str
    model: str
    prompt: str = ""
    #: The answer's other fields (``JobResult.answer``): tool calls, parsed value, ...
    answer: dict[str, Any] = field(default_factory=dict)


def entry_json(result: JobResult, spec: JobSpec) -> str:
    """What the cache keeps of a result: the answer (its text, tool calls, refusal, finish
    reason, log probabilities, parsed value), its usage and its source job (and the
    prompt, for the semantic guard)."""
    return json.dumps({"text": result.text, "usage": result.usage.model_dump()
                       if result.usage else None, "source": result.cache_source or result.id,
                       "provider": result.provider, "model": result.model,
                       "prompt": cachekey.semantic_text(spec), "at": time.time(),
                       "answer": result.answer()})


def parse_entry(raw: str) -> Entry:
    data: dict[str, Any] = orjson.loads(raw)
    usage = Usage.model_validate(data["usage"]) if data.get("usage") else None
    return Entry(text=data["text"], usage=usage, source=data["source"],
                 provider=data["provider"], model=data["model"],
                 prompt=str(data.get("prompt") or ""), answer=data.get("answer") or {})


def hit_result(spec: JobSpec, entry: Entry, now: float, similarity: float | None = None,
               prices: PriceBook | None = None) -> JobResult:
    """The result of a job answered from the cache (a semantic hit has a similarity): it
    cost 0 and saved what its own call would have cost (``jobs.costs.hit_usage``)."""
    price = prices.price(spec.provider, spec.model) if prices is not None else None
    return JobResult(id=spec.id, state=JobState.SUCCEEDED, text=entry.text,
                     usage=hit_usage(entry.usage, price), provider=spec.provider,
                     model=spec.model, created_at=spec.created_at, deadline=spec.deadline,
                     started_at=now, finished_at=now,
                     cache="exact" if similarity is None else "semantic",
                     cache_source=entry.source, cache_similarity=similarity, attempts=0,
                     **entry.answer)


def lookup(queue: RedisQueue, specs: Sequence[JobSpec], settings: Settings,
           ) -> tuple[dict[str, Entry], dict[str, str]]:
    """Exact hits of the cacheable jobs (by job id), and the cache key of every cacheable
    job that missed."""
    keyed = [(s, cachekey.exact_key(s, settings)) for s in specs
             if cachekey.cacheable(s, settings)]
    if not keyed:
        return {}, {}
    found = queue.cache_get([k for _, k in keyed])
    hits: dict[str, Entry] = {}
    misses: dict[str, str] = {}
    for (spec, key), raw in zip(keyed, found, strict=True):
        if raw is not None:
            hits[spec.id] = parse_entry(raw)
        else:
            misses[spec.id] = key
    return hits, misses


def put(queue: RedisQueue, settings: Settings, results: Sequence[JobResult],
        specs: dict[str, JobSpec]) -> int:
    """Store the SUCCEEDED results of cacheable jobs; return how many. An answer is
    cached under the deployment that produced it: a fallback's answer is an entry of the
    fallback (a later request for it is a hit), never of the job's own deployment."""
    stored = 0
    now = time.time()
    for res in results:
        spec = specs.get(res.id)
        if (spec is None or res.state is not JobState.SUCCEEDED
                or (res.text is None and not res.tool_calls) or res.cache is not None
                or not cachekey.cacheable(spec, settings)):
            continue
        if (res.provider, res.model) != (spec.provider, spec.model) and res.provider:
            spec = spec.model_copy(update={"provider": res.provider,
                                           "model": res.model or spec.model})
        queue.cache_put(cachekey.exact_key(spec, settings), cachekey.partition(spec, settings),
                        entry_json(res, spec), ttl_s=settings.cache_ttl_s, now=now,
                        max_entries=settings.cache_max_entries,
                        max_bytes=settings.cache_max_bytes)
        stored += 1
    return stored


def settle(queue: RedisQueue, results: Sequence[JobResult], stored: Sequence[bool | str],
           record: Recorder, prices: PriceBook | None = None) -> None:
    """``results`` were stored (``stored``: what ``RedisQueue.finish`` answered for
    each); the ones identical requests waited for (a cache key there) are final: their
    followers end with the leader's answer, or, if it did not succeed, run on their own."""
    leaders = {r.id: x for r, x in zip(results, stored, strict=True) if isinstance(x, str)}
    by_id = {r.id: r for r in results}
    for leader, key in leaders.items():
        followers = queue.take_followers(leader, key)
        if not followers:
            continue
        res = by_id[leader]
        if res.state is not JobState.SUCCEEDED:
            queue.release_followers(followers)
            continue
        loaded = queue.load(followers)
        now = time.time()
        price = (prices.price(res.provider or "", res.model or "")
                 if prices is not None and res.provider else None)
        out: list[JobResult] = []
        tenants: list[str] = []
        classes: list[int] = []
        for spec, state in loaded:
            if spec is None or state != "FOLLOWING":
                continue  # cancelled meanwhile, or gone
            out.append(JobResult(id=spec.id, state=JobState.SUCCEEDED, text=res.text,
                                 usage=hit_usage(res.usage, price), provider=res.provider,
                                 model=res.model, created_at=spec.created_at,
                                 deadline=spec.deadline, started_at=res.started_at,
                                 finished_at=now, cache="coalesced", cache_source=leader,
                                 attempts=0, **res.answer()))
            tenants.append(spec.tenant)
            classes.append(int(spec.priority))
        if out:
            record(out, tenants, classes)  # counted as coalesced cache hits there


def purge_pattern(tenant: str | None = None, model: str | None = None,
                  key: str | None = None) -> tuple[str, str]:
    """The entries to purge, as globs on their partition and on their hash: a tenant's
    (``tenant``, or ``_shared``), a model's (``provider|model``, or a model name of any
    provider), one key (``partition:hash`` or the hash alone), or their intersection;
    everything when none is given."""
    if key:
        if ":" in key:  # a whole key: partition:hash (a hash has no ':'; a model may)
            part, _, digest = key.rpartition(":")
            return part, digest
        return f"{tenant or '*'}|*", key
    if model:
        provider, _, name = model.rpartition("|")
        deployment = f"{provider}|{name}" if provider else f"*|{name}"
    else:
        deployment = "*|*"
    return f"{tenant or '*'}|{deployment}|*", "*"


def purge(queue: RedisQueue, *, tenant: str | None = None, model: str | None = None,
          key: str | None = None) -> int:
    """Delete cached results (see ``purge_pattern``); return how many."""
    return queue.cache_purge(*purge_pattern(tenant, model, key))

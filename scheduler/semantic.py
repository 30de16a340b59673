"""The semantic cache: a job that allows it (``cache="semantic"``, a tenant in
``cache_semantic_tenants``) may be answered by an earlier job whose prompt is similar
enough, in the same partition (tenant, provider, model, parameters, system prompt).

The scheduler embeds such a job when it admits it and searches the partition's FAISS
index (inner product of unit vectors = cosine). A hit needs the similarity threshold (per
tenant) *and* the guard of ``jobs.cachekey`` (numbers, negations, polar words, quoted
text and names must agree); the best candidate's similarity is observed either way, so a
threshold can be calibrated. A job that misses adds its vector to the index and to Redis
(``pb:cache:v:{partition}``, entry key -> float32 bytes); its cached entry exists once a
worker stores its answer, and candidates whose entry is missing (not answered yet,
failed, expired, purged) are passed over. The index is rebuilt from Redis when a
scheduler becomes active.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import redis

from config import keys
from config.settings import Settings
from jobs import cachekey
from jobs.cache import Entry, parse_entry
from jobs.models import JobSpec
from scheduler.embedders import Embedder, Vectors

#: Candidates checked per lookup (the best first).
CANDIDATES = 5


@dataclass(frozen=True)
class Hit:
    """A semantic hit: the cached answer, its key and the similarity."""

    entry: Entry
    key: str
    similarity: float


@dataclass
class _Index:
    index: faiss.Index
    keys: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """Lookups of one admission: hits by job id; best similarity of every lookup, and
    how many lookups found no hit because the guard refused every candidate above the
    threshold."""

    hits: dict[str, Hit] = field(default_factory=dict)
    best: list[float] = field(default_factory=list)
    guarded: int = 0


class SemanticCache:
    """The scheduler's semantic indexes, one per partition."""

    def __init__(self, r: redis.Redis, settings: Settings, embedder: Embedder) -> None:
        self.r = r
        self.settings = settings
        self.embedder = embedder
        self._indexes: dict[str, _Index] = {}

    def load(self) -> int:
        """Rebuild every partition's index from Redis; return how many vectors."""
        self._indexes = {}
        prefix = keys.cache_vectors("")
        total = 0
        names = list(self.r.scan_iter(match=keys.cache_vectors("*"), count=1000))
        if not names:
            return 0
        binary = self._binary()  # vectors are bytes: a client that does not decode them
        for name in names:
            part = str(name)[len(prefix):]
            raw: dict[bytes, bytes] = binary.hgetall(str(name))  # type: ignore[assignment]
            for key, blob in raw.items():
                vec = np.frombuffer(blob, dtype=np.float32)
                if vec.shape[0] == self.embedder.dim:
                    self._add(part, key.decode(), vec.reshape(1, -1))
                    total += 1
        binary.close()
        return total

    def _binary(self) -> redis.Redis:
        """A client of the same server whose replies stay bytes."""
        pool = self.r.connection_pool
        kwargs = {**pool.connection_kwargs, "decode_responses": False}
        return redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs))

    def _add(self, part: str, key: str, vec: Vectors) -> None:
        idx = self._indexes.get(part)
        if idx is None:
            idx = self._indexes[part] = _Index(faiss.IndexFlatIP(self.embedder.dim))
        idx.index.add(np.ascontiguousarray(vec, dtype=np.float32))
        idx.keys.append(key)

    def threshold(self, tenant: str) -> float:
        return self.settings.cache_semantic_thresholds.get(
            tenant, self.settings.cache_semantic_threshold)

    def lookup(self, specs: Sequence[JobSpec]) -> Outcome:
        """Search for the jobs that allow it; remember the ones that miss."""
        out = Outcome()
        wanted = [s for s in specs if cachekey.cacheable(s, self.settings)
                  and cachekey.semantic_allowed(s, self.settings)]
        if not wanted:
            return out
        texts = [cachekey.semantic_text(s) for s in wanted]
        vectors = self.embedder.embed(texts)
        remember: list[tuple[str, str, Vectors]] = []
        for spec, text, vec in zip(wanted, texts, vectors, strict=True):
            part = cachekey.semantic_partition(spec, self.settings)
            hit = self._search(part, vec.reshape(1, -1), text, self.threshold(spec.tenant),
                               out)
            if hit is not None:
                out.hits[spec.id] = hit
            else:
                remember.append((part, cachekey.exact_key(spec, self.settings),
                                 vec.reshape(1, -1)))
        if remember:
            pipe = self.r.pipeline(transaction=False)
            for part, key, vec in remember:
                self._add(part, key, vec)
                pipe.hset(keys.cache_vectors(part), key, vec.astype(np.float32).tobytes())
                pipe.expire(keys.cache_vectors(part), self.settings.cache_ttl_s * 2)
            pipe.execute()
        return out

    def _search(self, part: str, vec: Vectors, text: str, threshold: float,
                out: Outcome) -> Hit | None:
        idx = self._indexes.get(part)
        if idx is None or idx.index.ntotal == 0:
            out.best.append(0.0)
            return None
        k = min(CANDIDATES, idx.index.ntotal)
        sims, rows = idx.index.search(np.ascontiguousarray(vec, dtype=np.float32), k)
        live = [(float(s), int(r)) for s, r in zip(sims[0], rows[0], strict=True) if r >= 0]
        out.best.append(live[0][0] if live else 0.0)
        candidates = [(s, r) for s, r in live[:CANDIDATES] if s >= threshold]
        if not candidates:
            return None
        raws = self.r.mget([keys.cache_entry(idx.keys[r]) for _, r in candidates])
        refused = False
        for (sim, row), raw in zip(candidates, raws, strict=True):
            if raw is None:
                continue  # not answered yet, failed, or gone
            entry = parse_entry(str(raw))
            if cachekey.guard(text, entry.prompt) is not None:
                refused = True
                continue
            return Hit(entry, idx.keys[row], sim)
        out.guarded += refused
        return None

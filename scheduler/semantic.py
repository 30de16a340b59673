"""The semantic cache: a job that allows it (``cache="semantic"``, a tenant in
``cache_semantic_tenants``) may be answered by an earlier job whose prompt is similar
enough, in the same partition (tenant, provider, model, parameters, system prompt).

The scheduler embeds such a job when it admits it and searches the partition's FAISS
index (inner product of unit vectors = cosine). A hit needs the similarity threshold (per
tenant) *and* the guard of ``jobs.cachekey`` (numbers, negations, polar words, quoted
text and names must agree); the best candidate's similarity is observed either way, so a
threshold can be calibrated. A job that misses adds its vector to the index and to Redis
(``pb:cache:v:{partition}``, entry key -> float32 bytes, and ``pb:cache:vorder``, every
vector by the time it was stored); its cached entry exists once a worker stores its
answer, and candidates whose entry is missing (not answered yet, failed, expired,
purged) are passed over.

The index is bounded: at most ``cache_semantic_max_entries`` vectors and
``cache_semantic_max_bytes`` bytes over all partitions, and none older than the cache's
``cache_ttl_s`` (its answer is gone by then); the oldest leave first, from memory and
from Redis. A scheduler that becomes active rebuilds the index from Redis in pages,
renewing its lease between them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import redis

from config import keys
from config.settings import Settings
from jobs import cachekey
from jobs.cache import Entry, parse_entry
from jobs.models import JobSpec
from jobs.queue import twin
from scheduler.embedders import Embedder, Vectors

#: Candidates checked per lookup (the best first).
CANDIDATES = 5
#: Vectors read from Redis per page of a reload.
LOAD_PAGE = 2000
#: Bytes one vector costs beyond its float32 values (its key, in memory and in Redis).
KEY_BYTES = 128
#: Once over a bound, the index is trimmed to this share of it (trims are batched).
TRIM_TO = 0.95


@dataclass(frozen=True)
class Hit:
    """A semantic hit: the cached answer, its key and the similarity."""

    entry: Entry
    key: str
    similarity: float


@dataclass
class _Index:
    """One partition's vectors: a FAISS index of our ids, and each id's entry key."""

    index: faiss.IndexIDMap2
    keys: dict[int, str] = field(default_factory=dict)


@dataclass
class Lookups:
    """Lookups of one admission: hits by job id; best similarity of every lookup, and
    how many lookups found no hit because the guard refused every candidate above the
    threshold."""

    hits: dict[str, Hit] = field(default_factory=dict)
    best: list[float] = field(default_factory=list)
    guarded: int = 0


@dataclass(frozen=True, slots=True)
class _Stored:
    """One vector in the index, in the order they were stored."""

    at: float
    part: str
    id: int
    key: str


def member(part: str, key: str) -> str:
    """A vector's member of ``pb:cache:vorder``."""
    return f"{part}\t{key}"


class SemanticCache:
    """The scheduler's semantic indexes, one per partition, bounded together."""

    def __init__(self, r: redis.Redis, settings: Settings, embedder: Embedder,
                 clock: Callable[[], float] = time.time) -> None:
        self.r = r
        self.settings = settings
        self.embedder = embedder
        self.clock = clock
        self._indexes: dict[str, _Index] = {}
        self._order: deque[_Stored] = deque()
        self._known: set[tuple[str, str]] = set()
        self._next_id = 0

    # --- size --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    @property
    def vector_bytes(self) -> int:
        """What one vector costs against ``cache_semantic_max_bytes``."""
        return self.embedder.dim * 4 + KEY_BYTES

    @property
    def nbytes(self) -> int:
        """Bytes the index holds, as counted against its bound."""
        return len(self._order) * self.vector_bytes

    def _capacity(self) -> int:
        s = self.settings
        return max(1, min(s.cache_semantic_max_entries,
                          s.cache_semantic_max_bytes // self.vector_bytes))

    # --- loading -----------------------------------------------------------------------

    def load(self, renew: Callable[[], None] | None = None) -> int:
        """Rebuild the index from Redis, oldest first, ``LOAD_PAGE`` vectors a page,
        calling ``renew`` (the scheduler's lease) between pages; return how many vectors.
        Vectors past the cache's time or beyond the bound are dropped, here and in Redis."""
        self._indexes, self._order, self._known, self._next_id = {}, deque(), set(), 0
        cutoff = self.clock() - self.settings.cache_ttl_s
        self.r.zremrangebyscore(keys.CACHE_VECTOR_ORDER, "-inf", cutoff)
        # Only the newest that fit the bound are worth reading.
        total = int(self.r.zcard(keys.CACHE_VECTOR_ORDER))
        excess = total - self._capacity()
        if excess > 0:
            self._forget_oldest_in_redis(excess)
        binary = self._binary()  # vectors are bytes: a client that does not decode them
        try:
            start = 0
            while True:
                page: list[Any] = list(self.r.zrange(
                    keys.CACHE_VECTOR_ORDER, start, start + LOAD_PAGE - 1, withscores=True))
                if not page:
                    break
                start += len(page)
                self._load_page(binary, [(str(m), float(at)) for m, at in page])
                if renew is not None:
                    renew()
        finally:
            binary.close()
        return len(self._order)

    def _load_page(self, binary: redis.Redis, page: list[tuple[str, float]]) -> None:
        pipe = binary.pipeline(transaction=False)
        wanted: list[tuple[str, str, float]] = []
        for name, at in page:
            part, _, key = name.partition("\t")
            wanted.append((part, key, at))
            pipe.hget(keys.cache_vectors(part), key)
        gone: list[str] = []
        for (part, key, at), blob in zip(wanted, pipe.execute(), strict=True):
            vec = None if blob is None else np.frombuffer(blob, dtype=np.float32)
            if vec is None or vec.shape[0] != self.embedder.dim:
                gone.append(member(part, key))  # its hash expired, or another embedder's
                continue
            self._add(part, key, vec.reshape(1, -1), at)
        if gone:
            self.r.zrem(keys.CACHE_VECTOR_ORDER, *gone)

    def _forget_oldest_in_redis(self, n: int) -> None:
        oldest = [str(m) for m in self.r.zrange(keys.CACHE_VECTOR_ORDER, 0, n - 1)]
        pipe = self.r.pipeline(transaction=False)
        for name in oldest:
            part, _, key = name.partition("\t")
            pipe.hdel(keys.cache_vectors(part), key)
        if oldest:
            pipe.zrem(keys.CACHE_VECTOR_ORDER, *oldest)
        pipe.execute()

    def _binary(self) -> redis.Redis:
        """A client of the same server whose replies stay bytes."""
        return twin(self.r, decode_responses=False)

    # --- the index -----------------------------------------------------------------------

    def _add(self, part: str, key: str, vec: Vectors, at: float) -> bool:
        if (part, key) in self._known:
            return False
        idx = self._indexes.get(part)
        if idx is None:
            idx = self._indexes[part] = _Index(
                faiss.IndexIDMap2(faiss.IndexFlatIP(self.embedder.dim)))
        vid = self._next_id
        self._next_id += 1
        idx.index.add_with_ids(np.ascontiguousarray(vec, dtype=np.float32),
                               np.array([vid], dtype=np.int64))
        idx.keys[vid] = key
        self._order.append(_Stored(at, part, vid, key))
        self._known.add((part, key))
        return True

    def trim(self, pipe: redis.client.Pipeline | None = None) -> int:
        """Drop the oldest vectors while the index is over a bound or holds vectors past
        the cache's time (down to ``TRIM_TO`` of the bound, so trims come in batches);
        from Redis too (in ``pipe`` when given). Returns how many went."""
        cap = self._capacity()
        cutoff = self.clock() - self.settings.cache_ttl_s
        if len(self._order) <= cap and (not self._order or self._order[0].at >= cutoff):
            return 0
        keep = min(cap, max(1, int(cap * TRIM_TO))) if len(self._order) > cap else cap
        dropped: dict[str, list[_Stored]] = {}
        n = 0
        while self._order and (len(self._order) > keep or self._order[0].at < cutoff):
            old = self._order.popleft()
            dropped.setdefault(old.part, []).append(old)
            self._known.discard((old.part, old.key))
            n += 1
        own = pipe is None
        p = self.r.pipeline(transaction=False) if pipe is None else pipe
        for part, items in dropped.items():
            idx = self._indexes[part]
            idx.index.remove_ids(np.array([s.id for s in items],  # type: ignore[arg-type]
                                          dtype=np.int64))
            for s in items:
                idx.keys.pop(s.id, None)
            if not idx.keys:
                del self._indexes[part]
            p.hdel(keys.cache_vectors(part), *(s.key for s in items))
            p.zrem(keys.CACHE_VECTOR_ORDER, *(member(part, s.key) for s in items))
        if own:
            p.execute()
        return n

    def threshold(self, tenant: str) -> float:
        return self.settings.cache_semantic_thresholds.get(
            tenant, self.settings.cache_semantic_threshold)

    def lookup(self, specs: Sequence[JobSpec]) -> Lookups:
        """Search for the jobs that allow it; remember the ones that miss."""
        out = Lookups()
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
            now = self.clock()
            pipe = self.r.pipeline(transaction=False)
            for part, key, vec in remember:
                if not self._add(part, key, vec, now):
                    continue
                pipe.hset(keys.cache_vectors(part), key, vec.astype(np.float32).tobytes())
                pipe.expire(keys.cache_vectors(part), self.settings.cache_ttl_s * 2)
                pipe.zadd(keys.CACHE_VECTOR_ORDER, {member(part, key): now})
            self.trim(pipe)
            pipe.execute()
        return out

    def _search(self, part: str, vec: Vectors, text: str, threshold: float,
                out: Lookups) -> Hit | None:
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

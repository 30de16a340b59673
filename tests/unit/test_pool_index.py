"""A group that never empties keeps an index that fits what it holds."""

from __future__ import annotations

import numpy as np

from scheduler.pool import APPROX_THRESHOLD, REBUILD_AFTER, Group, PendingJob


def _jobs(start: int, n: int) -> list[PendingJob]:
    return [PendingJob(id=f"j{i}", key="k", priority=4, tenant="t", created_at=float(i),
                       deadline=None, tokens=10, prefix=(), seq=i) for i in range(start, start + n)]


def _drifting(rng: np.random.Generator, start: int, n: int, dim: int) -> np.ndarray:
    """Unit vectors around a centre that moves with ``start`` (prompts that drift)."""
    centre = np.zeros(dim, dtype=np.float32)
    centre[(start // 5_000) % dim] = 3.0
    v = rng.standard_normal((n, dim)).astype(np.float32) + centre
    return np.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), dtype=np.float32)


def test_a_bulk_stream_rebuilds_its_index_and_still_finds_its_jobs() -> None:
    dim, chunk, keep = 32, 1_000, APPROX_THRESHOLD + 2_000
    rng = np.random.default_rng(1)
    g = Group("k", 4, dim, horizon=60.0)
    indexes: list[object] = []  # the objects themselves: an id() may be reused
    last: np.ndarray | None = None
    added = 0
    while added < (REBUILD_AFTER + 2) * keep:
        jobs = _jobs(added, chunk)
        last = _drifting(rng, added, chunk, dim)
        g.add(jobs, last)
        added += chunk
        if not any(x is g.index for x in indexes):
            indexes.append(g.index)
        if len(g) > keep:  # the oldest are sent
            g.remove(list(g.jobs)[: len(g) - keep])
        assert g.index.ntotal == len(g)
    assert g.approximate
    assert len(indexes) >= 3  # flat, an inverted file, and at least one rebuild
    assert g.added_since_build <= REBUILD_AFTER * max(len(g), APPROX_THRESHOLD)
    # What was added last is found (the lists were trained on pending jobs, not the first).
    assert last is not None
    _, ids = g.search(last[:50], 1)
    hits = sum(int(ids[i, 0]) == added - chunk + i for i in range(50))
    assert hits >= 45

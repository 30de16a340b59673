"""Idempotency keys within one insert: which job holds each (tenant, key).

A key names one request. A job whose key is stored already maps to the stored job (the
same request) or is refused (another one); a job whose key an earlier job of the same
call used maps to that job, or is refused the same way. Pure functions: the store reads
the keys stored and writes the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jobs.errors import IdempotencyConflict
from jobs.models import JobSpec


def first_of_each_key(specs: Sequence[JobSpec]) -> dict[tuple[str, str], JobSpec]:
    """The first job of each (tenant, idempotency key) in a call; ``IdempotencyConflict``
    (naming both lines) when a later job reuses a key with another request."""
    firsts: dict[tuple[str, str], tuple[int, JobSpec]] = {}
    for pos, s in enumerate(specs, start=1):
        if not s.idempotency_key:
            continue
        key = (s.tenant, s.idempotency_key)
        seen = firsts.setdefault(key, (pos, s))
        first_pos, first = seen
        if first is not s and None not in (first.request_hash, s.request_hash) \
                and first.request_hash != s.request_hash:
            raise IdempotencyConflict(s.idempotency_key, first.id, line=pos,
                                      first_line=first_pos)
    return {key: first for key, (_, first) in firsts.items()}


def holders(specs: Sequence[JobSpec], firsts: Mapping[tuple[str, str], JobSpec],
            existing: Mapping[tuple[str, str], tuple[str, str | None]]) -> dict[str, str]:
    """``{id: id that holds its key}``: the stored job's for a key stored already (after
    checking the request is the same: ``IdempotencyConflict``), the call's first job's
    for a key used again within the call, its own otherwise."""
    mapping: dict[str, str] = {}
    for pos, s in enumerate(specs, start=1):
        key = (s.tenant, s.idempotency_key or "")
        stored = existing.get(key) if s.idempotency_key else None
        if stored is not None:
            if None not in (stored[1], s.request_hash) and stored[1] != s.request_hash:
                raise IdempotencyConflict(s.idempotency_key or "", stored[0], line=pos)
            mapping[s.id] = stored[0]
        else:
            mapping[s.id] = firsts[key].id if s.idempotency_key else s.id
    return mapping

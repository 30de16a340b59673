"""The backlog: intake entries read but not yet admitted to the pending pool.

The pool holds at most ``max_pool_jobs`` jobs (their vectors and indexes cost about
1.6 KB each). When more are waiting, as after an outage, the scheduler still reads every
intake entry at once (a few dozen bytes each: id, class, tenant, deadline) and admits
them to the pool as room frees, so that it knows about a critical job at the end of a
million bulk ones, and memory stays bounded by the pool.

Admission order: the highest class first, counting the classes a job has climbed by
waiting (one per ``aging_s``, as in the pool); inside a class, tenants in turn (so one
tenant's flood does not hold another tenant's jobs back); each tenant's jobs in arrival
order. A job whose deadline passes while it waits here is handed out for expiry. Pure:
the time is an argument.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from config.settings import PRIORITY_NAMES
from jobs.models import IntakeEntry


@dataclass
class _Class:
    """The waiting entries of one class: a queue per tenant, tenants taken in turn."""

    tenants: dict[str, deque[IntakeEntry]] = field(default_factory=dict)
    turn: deque[str] = field(default_factory=deque)

    def head(self) -> IntakeEntry | None:
        """The oldest entry of the tenant whose turn it is."""
        return self.tenants[self.turn[0]][0] if self.turn else None

    def oldest(self) -> float:
        """Arrival time of the oldest entry of any tenant."""
        return min(q[0].arrived for q in self.tenants.values())


@dataclass
class Backlog:
    """Entries waiting for room in the pool, by class and tenant."""

    aging_s: float = math.inf
    _classes: list[_Class] = field(
        default_factory=lambda: [_Class() for _ in PRIORITY_NAMES])
    _deadlines: list[tuple[float, str, IntakeEntry]] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set)
    _counts: list[int] = field(default_factory=lambda: [0] * len(PRIORITY_NAMES))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids

    def add(self, entries: list[IntakeEntry]) -> None:
        """Queue entries (ones already waiting are ignored)."""
        for e in entries:
            if e.job_id in self._ids:
                continue
            self._ids.add(e.job_id)
            self._counts[e.priority] += 1
            c = self._classes[e.priority]
            q = c.tenants.get(e.tenant)
            if q is None:
                q = c.tenants[e.tenant] = deque()
                c.turn.append(e.tenant)
            q.append(e)
            if e.deadline is not None:
                heapq.heappush(self._deadlines, (e.deadline, e.job_id, e))

    def _class_now(self, cls: int, now: float) -> int:
        """The class the oldest entry of ``cls`` has climbed to by waiting."""
        if cls == 0 or self.aging_s == math.inf:
            return cls
        waited = now - self._classes[cls].oldest()
        return max(0, cls - int(waited // self.aging_s))

    def take(self, n: int, now: float) -> list[IntakeEntry]:
        """Up to ``n`` entries in admission order; they leave the backlog."""
        out: list[IntakeEntry] = []
        while len(out) < n:
            live = [c for c in range(len(self._classes)) if self._classes[c].turn]
            if not live:
                break
            cls = min(live, key=lambda c: (self._class_now(c, now), c))
            out += self._take_from(cls, n - len(out))
        return out

    def _take_from(self, cls: int, n: int) -> list[IntakeEntry]:
        """Up to ``n`` entries of one class, a tenant at a time in turn."""
        c = self._classes[cls]
        out: list[IntakeEntry] = []
        while len(out) < n and c.turn:
            tenant = c.turn.popleft()
            q = c.tenants[tenant]
            entry = q.popleft()
            if entry.job_id in self._ids:  # else it expired while waiting
                out.append(entry)
                self._ids.discard(entry.job_id)
                self._counts[cls] -= 1
            if q:
                c.turn.append(tenant)
            else:
                del c.tenants[tenant]
        return out

    def expired(self, now: float) -> list[IntakeEntry]:
        """Entries whose deadline has passed; they leave the backlog."""
        out: list[IntakeEntry] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id, entry = heapq.heappop(self._deadlines)
            if job_id in self._ids:  # else already admitted
                self._ids.discard(job_id)  # its queue entry is skipped when reached
                self._counts[entry.priority] -= 1
                out.append(entry)
        return out

    def counts(self) -> list[int]:
        """Entries waiting per class, critical first."""
        return list(self._counts)

    def oldest(self, cls: int) -> float | None:
        """Arrival time of the oldest entry of class ``cls`` (None if it has none)."""
        c = self._classes[cls]
        return c.oldest() if self._counts[cls] and c.tenants else None

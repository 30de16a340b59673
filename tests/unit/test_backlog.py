"""The scheduler's backlog: admission order by class (with aging), tenants in turn, expiry."""

from __future__ import annotations

from jobs.models import IntakeEntry
from scheduler.backlog import Backlog

T0 = 1_800_000_000.0


def entry(n: int, priority: int, tenant: str = "t", at: float = T0,
          deadline: float | None = None) -> IntakeEntry:
    return IntakeEntry(f"{int(at * 1000)}-{n}", f"job-{n}", priority, tenant, deadline)


def test_a_critical_entry_behind_a_million_bulk_ones_is_admitted_first() -> None:
    b = Backlog()
    b.add([entry(i, 4) for i in range(100_000)])
    b.add([entry(100_000, 0)])
    assert len(b) == 100_001
    first = b.take(3, now=T0)
    assert [e.job_id for e in first] == ["job-100000", "job-0", "job-1"]
    assert len(b) == 99_998


def test_tenants_take_turns_inside_a_class() -> None:
    b = Backlog()
    b.add([entry(i, 2, "flood") for i in range(1000)])
    b.add([entry(1000 + i, 2, "small") for i in range(2)])
    taken = [e.tenant for e in b.take(6, now=T0)]
    assert taken == ["flood", "small", "flood", "small", "flood", "flood"]


def test_waiting_long_enough_counts_as_a_higher_class() -> None:
    b = Backlog(aging_s=60.0)
    b.add([entry(1, 4, at=T0)])  # bulk, arrived at T0
    b.add([entry(2, 3, at=T0 + 170)])  # low, arrived later
    # 180 s later the bulk entry has climbed three classes (to high): it goes first.
    assert [e.job_id for e in b.take(2, now=T0 + 180)] == ["job-1", "job-2"]
    b.add([entry(3, 4, at=T0 + 170), entry(4, 3, at=T0 + 170)])
    assert [e.job_id for e in b.take(2, now=T0 + 180)] == ["job-4", "job-3"]


def test_entries_past_their_deadline_leave_for_expiry_and_are_never_admitted() -> None:
    b = Backlog()
    b.add([entry(1, 2, deadline=T0 + 5), entry(2, 2), entry(3, 2, deadline=T0 + 50)])
    assert b.expired(T0 + 1) == []
    late = b.expired(T0 + 10)
    assert [e.job_id for e in late] == ["job-1"]
    assert len(b) == 2 and "job-1" not in b
    assert [e.job_id for e in b.take(10, now=T0 + 10)] == ["job-2", "job-3"]
    assert b.expired(T0 + 100) == []  # job-3 was admitted: not expired here
    assert b.counts() == [0, 0, 0, 0, 0]


def test_an_entry_read_twice_waits_once() -> None:
    b = Backlog()
    b.add([entry(1, 2), entry(1, 2)])
    assert len(b) == 1 and b.counts() == [0, 0, 1, 0, 0]

"""The batching policy, as a pure function: tables of cases and generated pools."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from config.settings import Settings
from scheduler.embedders import HashedEmbedder
from scheduler.policy import Capacity, Plan, plan
from scheduler.pool import PendingJob, Pool, estimate_tokens, prefix_signature
from scheduler.service_time import ServiceModel

NOW = 1_000_000.0
EMB = HashedEmbedder(dim=64)
KEY_A = "echo|echo-1|{}"
KEY_B = "echo|echo-1|{\"temperature\":0.0}"
TEMPLATES = [
    "You are a helpful support agent for a bank. Answer briefly. Question: ",
    "Translate the following sentence into Spanish, keeping the tone: ",
    "Write SQL for this question about the orders table: ",
]


def base_settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[arg-type, call-arg]


@dataclass
class J:
    """A job for a test pool."""

    id: str
    text: str = "hello"
    priority: int = 2
    key: str = KEY_A
    tenant: str = "t"
    age: float = 0.0
    deadline_in: float | None = None


def make_pool(specs: list[J], aging_s: float = 600.0) -> Pool:
    pool = Pool(dim=EMB.dim, horizons=(1.0, 2.0, 5.0, 30.0, 300.0), aging_s=aging_s)
    jobs = [PendingJob(id=s.id, key=s.key, priority=s.priority, tenant=s.tenant,
                       created_at=NOW - s.age,
                       deadline=None if s.deadline_in is None else NOW + s.deadline_in,
                       tokens=estimate_tokens(s.text), prefix=prefix_signature(s.text))
            for s in specs]
    pool.add(jobs, EMB.embed([s.text for s in specs]))
    return pool


def sent_ids(p: Plan) -> list[str]:
    return [j.id for b in p.batches for j in b.jobs]


# --- tables of cases -------------------------------------------------------------------

def test_an_empty_pool_sends_nothing() -> None:
    assert plan(make_pool([]), NOW, base_settings(), Capacity(slots=2)).batches == []


def test_idle_workers_get_work_at_once_even_a_single_job() -> None:
    p = plan(make_pool([J("a", priority=4)]), NOW, base_settings(), Capacity(slots=2))
    assert sent_ids(p) == ["a"]
    assert p.batches[0].reason == "idle"


def test_busy_workers_with_room_hold_a_young_partial_batch() -> None:
    pool = make_pool([J("a", priority=2, age=0.05)])
    s = base_settings()  # normal waits 200 ms
    assert plan(pool, NOW, s, Capacity(slots=2, inflight=2)).batches == []


def test_busy_workers_with_room_take_a_batch_once_its_seed_waited_the_class_wait() -> None:
    pool = make_pool([J("a", priority=2, age=0.25)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=2, inflight=2))
    assert sent_ids(p) == ["a"] and p.batches[0].reason == "wait"


def test_busy_workers_with_room_take_a_full_batch() -> None:
    pool = make_pool([J(f"j{i}", text=TEMPLATES[0] + str(i)) for i in range(8)])
    p = plan(pool, NOW, base_settings(max_batch_size=4), Capacity(slots=2, inflight=2))
    assert [b.reason for b in p.batches] == ["full", "full"]
    assert sorted(sent_ids(p)) == sorted(f"j{i}" for i in range(8))


def test_without_room_only_deadline_pressure_sends() -> None:
    pool = make_pool([J("relaxed", age=100, key=KEY_B), J("urgent", deadline_in=0.3)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=2, inflight=4))
    assert sent_ids(p) == ["urgent"] and p.batches[0].reason == "deadline"


def test_a_job_that_cannot_make_its_deadline_is_expired_not_sent() -> None:
    pool = make_pool([J("late", deadline_in=0.01), J("gone", deadline_in=-5), J("fine")])
    p = plan(pool, NOW, base_settings(), Capacity(slots=4))
    assert sorted(j.id for j in p.expired) == ["gone", "late"]
    assert sent_ids(p) == ["fine"]


def test_deadline_jobs_are_not_forced_when_no_worker_is_alive() -> None:
    pool = make_pool([J("urgent", deadline_in=0.3)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=0))
    assert p.batches == [] and p.expired == []


def test_keys_never_share_a_batch() -> None:
    pool = make_pool([J(f"a{i}", key=KEY_A) for i in range(5)]
                     + [J(f"b{i}", key=KEY_B) for i in range(5)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=8))
    for b in p.batches:
        assert {j.key for j in b.jobs} == {b.key}
    assert len(sent_ids(p)) == 10


def test_higher_classes_go_first_and_a_held_class_blocks_lower_ones_of_its_key() -> None:
    pool = make_pool([J("crit", priority=0), J("bulk-old", priority=4, age=100),
                      J("high-young", priority=1, age=0.001, key=KEY_A),
                      J("bulk-b", priority=4, key=KEY_B, age=100)])
    # One batch of room beyond the running ones: critical takes it, and, capacity being
    # scarce, the lower classes of its key ride along in class order. Bulk of another key
    # is out of room.
    p = plan(pool, NOW, base_settings(), Capacity(slots=2, inflight=3))
    assert len(p.batches) == 1 and p.batches[0].cls == 0
    assert sent_ids(p) == ["crit", "high-young", "bulk-old"]


def test_riders_wait_while_workers_are_plentiful() -> None:
    pool = make_pool([J("crit", priority=0), J("bulk", priority=4)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=4))
    assert [[j.id for j in b.jobs] for b in p.batches] == [["crit"], ["bulk"]]


def test_similar_prompts_are_grouped_by_template() -> None:
    specs = [J(f"{t}-{i}", text=TEMPLATES[t] + f"case {i} about item {i * 7}")
             for i in range(12) for t in range(3)]
    pool = make_pool(specs)
    p = plan(pool, NOW, base_settings(max_batch_size=12), Capacity(slots=3))
    assert len(p.batches) == 3
    for b in p.batches:
        assert len({j.id.split("-")[0] for j in b.jobs}) == 1, "a batch mixed templates"
        assert b.shared_prefix_chars >= 32


def test_the_token_limit_holds_and_the_seed_always_goes() -> None:
    long = "x" * 4000  # about 1000 tokens each
    pool = make_pool([J(f"j{i}", text=long + str(i)) for i in range(5)])
    p = plan(pool, NOW, base_settings(max_batch_tokens=2500), Capacity(slots=1))
    assert all(b.tokens <= 2500 for b in p.batches)
    assert len(p.batches[0].jobs) == 2


def test_a_small_tenant_is_not_stuck_behind_a_large_backlog() -> None:
    specs = [J(f"big{i}", tenant="big", age=10 - i * 0.001, text=f"task {i}") for i in range(500)]
    specs.append(J("small", tenant="small", age=0.0, text="something else entirely"))
    pool = make_pool(specs)
    s = base_settings(max_batch_size=10, similarity_threshold=0.99)
    p = plan(pool, NOW, s, Capacity(slots=2))
    assert "small" in sent_ids(p), "the small tenant waited behind the big one"


def test_learned_service_time_expires_jobs_that_cannot_finish() -> None:
    service = ServiceModel()
    for size in (1, 2, 4, 8):
        service.observe("echo|echo-1", size, 1.0 + size * 0.5)  # a slow deployment
    pool = make_pool([J("tight", deadline_in=1.0), J("roomy", deadline_in=30.0)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=2), service)
    assert [j.id for j in p.expired] == ["tight"]


# --- properties over generated pools ---------------------------------------------------

#: Long system prompts (over 256 characters), so that generated pools hold prefix families.
LONG_TEMPLATES = [
    "You are the billing assistant of a telecom. " + "Follow the tariff rules exactly. " * 8,
    "You are the billing assistant of a telecom. " + "Answer in one short paragraph. " * 8,
    "You grade essays for a school district. " + "Use the rubric, cite the line. " * 9,
]

job_strategy = st.builds(
    J,
    id=st.uuids().map(str),
    text=st.sampled_from(TEMPLATES + LONG_TEMPLATES).flatmap(
        lambda t: st.text(alphabet="abcdefgh ", max_size=40).map(lambda s: t + s)),
    priority=st.integers(0, 4),
    key=st.sampled_from([KEY_A, KEY_B]),
    tenant=st.sampled_from(["t1", "t2", "t3"]),
    age=st.floats(0, 120),
    deadline_in=st.one_of(st.none(), st.floats(-5, 60)),
)


@hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(job_strategy, max_size=80, unique_by=lambda j: j.id),
       slots=st.integers(0, 6), inflight=st.integers(0, 12),
       size=st.integers(1, 16), max_tokens=st.integers(20, 400))
def test_plan_keeps_its_invariants(specs: list[J], slots: int, inflight: int, size: int,
                                   max_tokens: int) -> None:
    pool = make_pool(specs)
    s = base_settings(max_batch_size=size, max_batch_tokens=max_tokens)
    service = ServiceModel()
    p = plan(pool, NOW, s, Capacity(slots=slots, inflight=inflight), service)
    by_id = {sp.id: sp for sp in specs}

    # Every job is sent or expired at most once.
    counts = Counter(sent_ids(p) + [j.id for j in p.expired])
    assert not counts or max(counts.values()) == 1
    for b in p.batches:
        # No batch mixes keys or classes; size and token limits hold (the seed always goes).
        assert {j.key for j in b.jobs} == {b.key}
        # The seed is of the batch's class; riders come from lower classes only.
        assert b.jobs[0].cls == b.cls and all(j.cls >= b.cls for j in b.jobs)
        assert 1 <= len(b.jobs) <= size
        assert len(b.jobs) == 1 or b.tokens <= max_tokens
        # Nothing is sent that cannot make its deadline.
        for j in b.jobs:
            assert j.deadline is None or j.deadline - NOW >= service.estimate(j.key, 1)
    # Expired jobs really could not make it.
    for j in p.expired:
        assert j.deadline is not None and j.deadline - NOW < service.estimate(j.key, 1)
    # No inversion: while a class of a key keeps jobs pending, no lower class of it is sent.
    done = set(counts)
    for b in p.batches:
        for sp in specs:
            if sp.key == b.key and sp.priority < b.cls:
                assert sp.id in done, f"class {sp.priority} left pending while {b.cls} sent"
    # Work conservation: with a worker idle that a pending job's class may use (normal and
    # below leave the reserved quarter to critical and high), something is sent.
    cap = Capacity(slots=slots, inflight=inflight, reserved=min(slots // 4, max(0, slots - 1)))
    if any(cap.idle(sp.priority) > 0 for sp in specs if sp.id not in done):
        assert p.batches, "a worker was idle while jobs waited"
    assert set(by_id) >= done


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(big=st.integers(40, 200), smalls=st.integers(1, 6), size=st.integers(2, 8))
def test_every_tenant_seeds_a_batch_within_one_round(big: int, smalls: int, size: int) -> None:
    # One tenant's backlog, and a few tenants with a single job each, arriving last.
    specs = [J(f"big{i}", tenant="big", age=100 - i * 0.01, text=f"backlog item {i}")
             for i in range(big)]
    specs += [J(f"s{t}", tenant=f"small{t}", age=0.0, text=f"lone request {t}")
              for t in range(smalls)]
    pool = make_pool(specs)
    s = base_settings(max_batch_size=size, similarity_threshold=1.0)
    p = plan(pool, NOW, s, Capacity(slots=smalls + 1))
    served = {j.tenant for b in p.batches[:smalls + 1] for j in b.jobs}
    # Weighted fair sharing: the first round of batches serves every tenant, so no small
    # tenant waits more than about one batch behind the backlog.
    assert served == {"big"} | {f"small{t}" for t in range(smalls)}


def test_aging_promotes_a_waiting_job_one_class_per_bound() -> None:
    pool = make_pool([J("old-bulk", priority=4, age=250), J("new-bulk", priority=4, age=1),
                      J("old-low", priority=3, age=120)], aging_s=100)
    pool.promote(NOW)
    cls = {j.id: j.cls for j in pool.by_id.values()}
    # One class per 100 s waited: 250 s is two classes up, 120 s one.
    assert cls == {"old-bulk": 2, "new-bulk": 4, "old-low": 2}
    pool.promote(NOW + 60)
    assert pool.by_id["old-bulk"].cls == 1  # 310 s: a third bound passed
    assert pool.by_id["new-bulk"].cls == 4


def test_a_batch_says_how_much_of_its_prefix_jobs_left_pending_share() -> None:
    system = "You are the claims assistant of Northwind Insurance. Be precise. " * 40
    pool = make_pool([J(f"j{i}", system + f"claim {i}") for i in range(3)]
                     + [J("other", "Translate this sentence into Spanish please")])
    s = base_settings(max_batch_size=1)
    first = plan(pool, NOW, s, Capacity(slots=1)).batches[0]
    assert first.jobs[0].id.startswith("j")
    assert first.pending_prefix_chars >= 1024  # more claims wait with the same prefix
    pool.remove(["j0", "j1", "other"])
    alone = plan(pool, NOW, s, Capacity(slots=1)).batches[0]
    assert [j.id for j in alone.jobs] == ["j2"] and alone.pending_prefix_chars == 0


def test_inside_a_class_jobs_with_a_deadline_go_before_every_job_without_one() -> None:
    # Sixteen critical jobs without a deadline, each its own compatibility key (they cannot
    # share a batch), then one with a deadline six seconds away.
    pool = make_pool([J(f"free-{i}", f"question {i}", priority=0, key=f"echo|echo-1|{i}",
                        age=10.0) for i in range(16)]
                     + [J("due", "urgent question", priority=0, key="echo|echo-1|due",
                          deadline_in=6.0)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=1))
    assert sent_ids(p)[0] == "due"


def test_a_job_joins_a_batch_only_if_its_deadline_leaves_room_for_the_batch() -> None:
    service = ServiceModel()
    for size, seconds in ((1, 1.1), (8, 1.8), (16, 2.6)):  # ~0.1 s a job + 1 s a call
        service.observe("echo|echo-1", size, seconds)
    pool = make_pool([J("seed", "summarise ticket 0", deadline_in=1.5)]
                     + [J(f"n{i}", f"summarise ticket {i + 1}") for i in range(10)])
    p = plan(pool, NOW, base_settings(), Capacity(slots=1), service)
    batch = next(b for b in p.batches if b.jobs[0].id == "seed")
    # With 1.5 s left, the seed's batch may hold no more than ~4 jobs (1 s + 0.1 s each).
    assert len(batch.jobs) <= 5
    assert batch.estimate_s <= 1.5


# --- prefix families packed whole ---------------------------------------------------------

def _system(i: int) -> str:
    """A long system prompt of its own (300+ characters, different from the start)."""
    return f"[{i}] You are desk {i}'s assistant. " + f"Rule {i}: answer plainly. " * 14


def _families(sizes: dict[int, int], cls: int = 2, bare: int = 0) -> list[J]:
    jobs = [J(f"f{f}-{n}", text=f"{_system(f)}\n\nQuestion {n} about item {n * 7}?",
              priority=cls, age=10.0) for f, count in sizes.items() for n in range(count)]
    jobs += [J(f"bare-{n}", text=f"Bare question number {n}: what is {n} plus {n}?",
               priority=cls, age=10.0) for n in range(bare)]
    return jobs


def _drain(pool: Pool, s: Settings, cap: Capacity) -> list[list[str]]:
    """Plan until the pool is empty, removing what is sent; the batches' job ids."""
    batches: list[list[str]] = []
    while len(pool):
        p = plan(pool, NOW, s, cap)
        assert p.batches, "the policy stopped sending with jobs pending"
        batches += [[j.id for j in b.jobs] for b in p.batches]
        pool.remove([j.id for b in p.batches for j in b.jobs])
    return batches


def _landed(batches: list[list[str]]) -> dict[str, int]:
    """In how many batches each family landed."""
    seen: dict[str, set[int]] = {}
    for i, b in enumerate(batches):
        for job_id in b:
            if job_id.startswith("f"):
                seen.setdefault(job_id.split("-")[0], set()).add(i)
    return {f: len(v) for f, v in seen.items()}


def test_prefix_families_that_fit_a_batch_are_never_split() -> None:
    # Families of 20, 14, 12, 9, 5 and 3 and ten bare prompts, workers busy: topping a
    # batch up with the next nearest jobs used to take part of another family.
    sizes = {0: 20, 1: 14, 2: 12, 3: 9, 4: 5, 5: 3}
    pool = make_pool(_families(sizes, bare=10))
    batches = _drain(pool, base_settings(max_batch_size=32), Capacity(slots=1, inflight=1))
    assert _landed(batches) == {f"f{f}": 1 for f in sizes}
    assert all(len(b) <= 32 for b in batches)
    assert sum(len(b) for b in batches) == sum(sizes.values()) + 10


def test_a_family_larger_than_a_batch_fills_whole_batches_and_its_rest_stays_together() -> None:
    pool = make_pool(_families({0: 70, 1: 6}))
    batches = _drain(pool, base_settings(max_batch_size=32), Capacity(slots=1, inflight=1))
    assert _landed(batches) == {"f0": 3, "f1": 1}  # 32 + 32 + 6: the least it can
    assert sorted(len(b) for b in batches)[-2:] == [32, 32]


def test_spreading_over_idle_workers_does_not_cut_a_family_that_fits_a_batch() -> None:
    # 40 jobs and 4 idle workers: batches of about 10, but a family of 18 goes whole.
    pool = make_pool(_families({0: 18, 1: 12}, bare=10))
    p = plan(pool, NOW, base_settings(max_batch_size=32), Capacity(slots=4))
    landed = _landed([[j.id for j in b.jobs] for b in p.batches])
    assert landed == {"f0": 1, "f1": 1}


def test_riders_leave_a_small_lower_class_family_whole_and_cut_the_largest() -> None:
    # A batch of 3 critical jobs takes riders from bulk up to the break-even size (8-9)
    # when capacity is scarce. Bulk holds a family of 10 and one of 40: neither fits in
    # the 5 places whole, so the riders come from the family of 40 (split across batches
    # anyway), and the family of 10 stays whole for a batch of its own.
    jobs = _families({0: 3}, cls=0) + _families({1: 10, 2: 40}, cls=4)
    pool = make_pool(jobs)
    service = ServiceModel()
    for _ in range(20):  # a line whose break-even size is 8
        service.observe("echo|echo-1", 1, 0.9)
        service.observe("echo|echo-1", 32, 4.0)
    p = plan(pool, NOW, base_settings(max_batch_size=32), Capacity(slots=1), service)
    line = service.line(KEY_A)
    want = math.ceil(line.fixed / line.per_job)  # the break-even size
    first = [j.id for j in p.batches[0].jobs]
    assert sorted(x.split("-")[0] for x in first) == ["f0"] * 3 + ["f2"] * (want - 3)

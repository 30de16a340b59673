"""The cache-aware routing rules (pure): affinity, the load that overrides it, idle
replicas, the cache bound, learned latency, replicas cooling down."""

from __future__ import annotations

from config import keys
from config.settings import Settings
from scheduler.pool import PendingJob, prefix_signature
from scheduler.routing import Choice, ReplicaSpec, Router, Routing, RoutingRules


def router(n: int = 2, cache: int = 10_000, **rules: float) -> Router:
    return Router([ReplicaSpec(f"r{i}", cache_tokens=cache) for i in range(n)],
                  RoutingRules(**rules))


def send(r: Router, batch: str, family: int | None, est: float = 1.0, prefix: int = 1000,
         other: int = 0, unavailable: tuple[int, ...] = ()) -> Choice:
    choice = r.choose(family, prefix, est, unavailable)
    r.sent(batch, choice, family, prefix, est, now=0.0, other_tokens=other)
    return choice


def test_a_family_returns_to_the_replica_that_holds_it_while_both_carry_load() -> None:
    r = router()
    first = send(r, "a1", family=1)
    second = send(r, "b1", family=2)  # a new family goes to the least loaded
    assert first.replica != second.replica and not first.affinity
    again = send(r, "a2", family=1)
    assert again.replica == first.replica and again.affinity
    assert send(r, "b2", family=2).replica == second.replica


def test_load_well_above_the_least_loaded_overrides_affinity() -> None:
    r = router(imbalance_batches=2, imbalance_s=0.0, idle_batches=0)
    home = send(r, "a0", family=1).replica
    send(r, "x", family=9, est=0.5)  # the other replica carries a little
    for i in range(1, 3):  # up to two batches more than the other: stays home
        assert send(r, f"a{i}", family=1).replica == home
    moved = send(r, "a3", family=1)
    assert moved.replica != home and not moved.affinity
    # From then on both hold the family: the less loaded of them gets it.
    assert send(r, "a4", family=1).affinity


def test_an_idle_replica_takes_work_from_a_busy_holder() -> None:
    r = router(imbalance_batches=100)
    home = send(r, "a0", family=1).replica
    other = send(r, "a1", family=1)  # the holder has a batch, the other none: balance
    assert other.replica != home


def test_the_record_is_bounded_by_the_cache_oldest_out_churn_included() -> None:
    r = router(n=1, cache=3000)
    for fam in (1, 2, 3):
        send(r, f"b{fam}", family=fam, prefix=1000)
    snap = r.snapshot()[0]
    assert snap["families"] == 3 and snap["cached_tokens"] == 3000
    send(r, "b4", family=4, prefix=1000)  # family 1 leaves
    assert 1 not in r.replicas[0].families and 4 in r.replicas[0].families
    send(r, "q", family=None, prefix=0, other=2500)  # prompts nobody shares push out more
    assert [k for k in r.replicas[0].families if k >= 0] == []


def test_done_frees_the_work_and_teaches_each_replica_its_speed() -> None:
    r = router(idle_batches=0, imbalance_batches=0, imbalance_s=0.0, latency_alpha=1.0)
    a = send(r, "a", family=1, est=1.0)
    assert r.snapshot()[a.replica]["outstanding"] == 1
    r.done("a", seconds=3.0)  # measured at three times the estimate
    assert r.snapshot()[a.replica]["outstanding"] == 0
    assert r.replicas[a.replica].ratio == 3.0
    # One batch on each: the slow replica's counts triple, so the next goes to the other.
    send(r, "s", family=5, est=1.0, unavailable=(1 - a.replica,))
    send(r, "f", family=6, est=1.0, unavailable=(a.replica,))
    assert send(r, "t", family=7, est=1.0).replica == 1 - a.replica


def test_a_cooling_replica_is_skipped_and_listed_last_unless_all_are() -> None:
    r = router(n=3)
    home = send(r, "a", family=1).replica
    choice = send(r, "b", family=1, unavailable=(home,))
    assert choice.replica != home and choice.order[-1] == home
    # Every one cooling: the rule is the least loaded of all, which is the third (the
    # other two carry a batch each), listed first; the others follow by load.
    third = ({0, 1, 2} - {home, choice.replica}).pop()
    every = send(r, "c", family=2, unavailable=(0, 1, 2))
    assert every.replica == third and not every.affinity
    assert sorted(every.order) == [0, 1, 2]


def test_batches_that_never_report_are_forgotten() -> None:
    r = router()
    choice = r.choose(1, 100, 1.0)
    r.sent("lost", choice, 1, 100, 1.0, now=10.0)
    assert r.forget_before(5.0) == 0
    assert r.forget_before(11.0) == 1
    assert r.snapshot()[choice.replica]["outstanding"] == 0


def test_the_load_balancer_policies_ignore_prefixes() -> None:
    rr = Router([ReplicaSpec("a"), ReplicaSpec("b")], policy="round_robin")
    picks = [rr.choose(1, 1000, 1.0).replica for _ in range(4)]
    assert sorted(picks) == [0, 0, 1, 1]
    lo = Router([ReplicaSpec("a"), ReplicaSpec("b")], policy="least_outstanding")
    first = lo.choose(1, 1000, 1.0)
    lo.sent("x", first, 1, 1000, 1.0, now=0.0)
    assert lo.choose(1, 1000, 1.0).replica != first.replica  # the same family, elsewhere


TEMPLATE = "You are the help desk's assistant. Follow the handbook. " * 8


def pending(n: int, model: str, text: str = TEMPLATE) -> list[PendingJob]:
    return [PendingJob(id=f"{model}-{i}", key=f"openai|{model}|{{}}", priority=2,
                       tenant="t", created_at=0.0, deadline=None, tokens=len(text) // 4,
                       prefix=prefix_signature(f"{text} question {i}"))
            for i in range(n)]


def routing(replicas: int = 2, **rules: object) -> Routing:
    urls = ",".join(f"http://10.0.0.{i}:8000/v1" for i in range(replicas))
    return Routing(Settings(openai_base_url=urls, _env_file=None,  # type: ignore[call-arg]
                            **rules))


def route(rt: Routing, batch: str, model: str, est: float = 1.0) -> int:
    order = rt.route(batch, pending(4, model), 256, est, f"openai|{model}", now=0.0)
    assert order is not None
    return order[0]


def outstanding(rt: Routing) -> list[int]:
    return [row["outstanding"] for row in rt.snapshot()]


def test_two_models_on_one_replica_set_see_each_others_load() -> None:
    rt = routing()
    first = route(rt, "a", "model-a")
    # The other model's batch goes to the other replica: the first one is busy.
    assert route(rt, "b", "model-b") == 1 - first
    assert outstanding(rt) == [1, 1]
    assert {row["deployment"] for row in rt.snapshot()} == {"openai"}  # one replica set


def test_a_prefix_family_is_held_per_model() -> None:
    rt = routing()
    home = route(rt, "a1", "model-a")
    rt.done("a1", 1.0)
    # The same prompts for another model: not cached anywhere (no affinity); for the
    # first model again: back home, by affinity.
    order = rt.route("b1", pending(4, "model-b"), 256, 1.0, "openai|model-b", now=0.0)
    router = rt.routers["openai"]
    assert router is not None and order is not None
    assert router[0].replicas[order[0]].misses == 1
    rt.done("b1", 1.0)
    assert route(rt, "a2", "model-a") == home
    assert router[0].replicas[home].hits == 1
    # Two families, one per model, each counted (negative keys are the record's
    # anonymous entries: a family must never look like one).
    assert sum(row["families"] for row in rt.snapshot()) == 2


def test_a_batch_that_ended_without_a_timing_leaves_its_replica() -> None:
    rt = routing()
    route(rt, "ran", "model-a")
    route(rt, "nothing", "model-b")
    assert sum(outstanding(rt)) == 2
    rt.done("nothing", None)  # no call: nothing learned, the work is gone
    assert sum(outstanding(rt)) == 1
    rt.done("ran", 2.0, replica=0)
    assert outstanding(rt) == [0, 0]
    rt.done("unknown", None)  # a batch it never routed (or forgot): nothing happens


def test_a_replica_cooling_for_one_model_is_skipped_for_that_model_only() -> None:
    rt = routing()
    rt.cooling = {keys.replica("openai|model-a", "http://10.0.0.0:8000/v1")}
    assert route(rt, "a", "model-a") == 1
    rt.done("a", None)
    assert route(rt, "b", "model-b") == 0
    assert [row["cooling"] for row in rt.snapshot()] == [True, False]


def test_a_slowed_replica_gets_only_a_probe_now_and_then_and_its_share_back_when_it_clears(
) -> None:
    r = router(n=2)
    r.slowed[1] = {"latency_high|...|B"}
    r.probe_s = 5.0
    went: list[tuple[float, int]] = []
    for i in range(200):  # a batch every 0.1 s, each done before the next
        now = i * 0.1
        choice = r.choose(i % 4, 1000, 1.0, now=now)
        r.sent(f"b{i}", choice, i % 4, 1000, 1.0, now=now)
        went.append((now, choice.replica))
        if choice.replica == 1:
            assert choice.order == (1, 0) and not choice.affinity
        else:
            assert choice.order == (0, 1)  # the slowed one is tried last
        r.done(f"b{i}")
    probes = [t for t, replica in went if replica == 1]
    assert probes == [0.0, 5.0, 10.0, 15.0]  # one every probe_s: never ejected
    # A probe waits while the slowed replica still has a batch out.
    r.sent("stuck", Choice((1, 0), False), None, 0, 1.0, now=20.0)
    assert all(r.choose(None, 0, 1.0, now=30.0 + i).replica == 0 for i in range(10))
    r.done("stuck")
    del r.slowed[1]  # cleared: both share the load again
    back = [send(r, f"d{i}", family=None).replica for i in range(10)]
    assert back.count(1) >= 4
    # However slow it is, a probe holds at most a fifth of a slot: four batch times apart.
    r = router(n=2)
    r.slowed[1] = {"x"}
    r.replicas[1].ratio = 10.0
    r.sent("p", Choice((1, 0), False), None, 0, 1.0, now=20.0)
    r.done("p")
    assert r.choose(None, 0, 1.0, now=45.0).replica == 0  # 25 s < 4 x 1 s x 10
    assert r.choose(None, 0, 1.0, now=60.0).replica == 1


def test_routing_slows_a_replica_by_its_address_until_every_reason_clears() -> None:
    routing = Routing(Settings(openai_base_url="http://a:1/v1,http://b:2/v1",
                               _env_file=None))  # type: ignore[call-arg]
    assert routing.slow("openai", "b:2/v1", "latency_high|x")
    assert routing.slow("openai", "b:2/v1", "throughput_low|x")
    assert not routing.slow("openai", "c:3/v1", "latency_high|x")  # no such replica
    assert not routing.slow("anthropic", "b:2/v1", "latency_high|x")  # no replicas
    rows = {row["replica"]: row for row in routing.snapshot()}
    assert rows["http://b:2/v1"]["slowed"] and not rows["http://a:1/v1"]["slowed"]
    assert routing.slow("openai", "b:2/v1", "latency_high|x", on=False)
    assert {row["replica"]: row["slowed"] for row in routing.snapshot()}["http://b:2/v1"]
    assert routing.slow("openai", "b:2/v1", "throughput_low|x", on=False)
    assert not any(row["slowed"] for row in routing.snapshot())

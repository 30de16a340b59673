"""HTTP providers against real HTTP servers on loopback that inject faults.

Each test runs a real batch (``BatchRunner``) on a real Redis-compatible server and SQLite
file, against ``tests.fake_llm``, and checks the attempts the server saw, their spacing,
the final states, and that the other jobs' results are kept.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from config import keys
from config.settings import Settings
from jobs.models import JobResult, JobState
from jobs.queue import RedisQueue, connect
from jobs.store import JobStore
from producers.client import Client
from tests.fake_llm import FakeLLM, FakeServer
from workers.batch import BatchRunner
from workers.providers import Provider, create_provider
from workers.ratelimit import RateLimiter

pytestmark = pytest.mark.integration

SECRET = "sk-test-NEVER-LOG-THIS-1234"


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeServer() as state:
        yield state


def llm_settings(settings: Settings, fake: FakeLLM, **kw: object) -> Settings:
    base: dict[str, object] = {
        "openai_base_url": f"{fake.url}/v1", "openai_api_key": SecretStr(SECRET),
        "anthropic_base_url": fake.url, "anthropic_api_key": SecretStr(SECRET),
        "openai_prefix_strategy": "parallel", "provider_retry_base_s": 0.05,
        "provider_retry_max_s": 2.0, "provider_read_timeout_s": 0.5,
        "provider_total_timeout_s": 5.0, "provider_max_attempts": 4,
        "anthropic_min_cache_tokens": 50,
    }
    base.update(kw)
    return settings.model_copy(update=base)


def run_batch(s: Settings, jobs: list[dict[str, object]], *, warm: bool = True,
              prefix_hint: int = 0) -> list[JobResult]:
    """Submit the jobs, run them as one batch in this process, return their results.

    ``warm``: their deployments answered recently (else a batch probes with one request).
    """
    providers: dict[str, Provider] = {}

    def provider_for(name: str) -> Provider:
        if name not in providers:
            providers[name] = create_provider(name, s)
        return providers[name]

    with Client(s) as client:
        ids = client.submit_many(jobs)
        if warm:
            for spec in (client.spec(i) for i in ids):
                client.r.set(keys.healthy(f"{spec.provider}|{spec.model}"), "1", ex=60)
        batch_id = str(uuid.uuid4())
        assert client.queue.acquire_lease("test-scheduler", 30)  # claimed as the scheduler does
        assert client.queue.claim("test-scheduler", batch_id, "{}",
                                  [(i, client.spec(i).tenant) for i in ids], time.time(), 2)
        runner = BatchRunner(s, RedisQueue(connect(s.redis_url)), JobStore(s.database_url),
                             provider_for)
        runner.run(batch_id, "send-1", ids, prefix_hint=prefix_hint)
        return [client.result(i, timeout=5) for i in ids]


def job(text: str, **kw: object) -> dict[str, object]:
    return {"prompt": text, "provider": "openai", "model": "test-model", **kw}


def test_429_honours_retry_after_and_the_others_are_kept(settings: Settings,
                                                         fake: FakeLLM) -> None:
    fake.script("throttled", ["429:retry-after-ms=400", "ok"])
    results = run_batch(llm_settings(settings, fake),
                        [job("throttled question"), job("calm one"), job("calm two")])
    assert [r.state for r in results] == [JobState.SUCCEEDED] * 3
    assert [r.attempts for r in results] == [2, 1, 1]
    first, second = fake.requests_for("throttled")
    assert second.start - first.end >= 0.4, "retried before Retry-After"
    assert results[0].usage is not None and results[0].usage.cached_tokens == 8


def test_5xx_backs_off_exponentially_then_succeeds(settings: Settings, fake: FakeLLM) -> None:
    fake.script("flaky", ["500", "503", "ok"])
    results = run_batch(llm_settings(settings, fake, provider_retry_base_s=0.2),
                        [job("flaky question")])
    assert results[0].state is JobState.SUCCEEDED and results[0].attempts == 3
    a, b, c = fake.requests_for("flaky")
    gap1, gap2 = b.start - a.end, c.start - b.end
    assert 0.2 <= gap1 < 0.5 and 0.4 <= gap2 < 0.9, (gap1, gap2)


@pytest.mark.parametrize("fault", ["stall", "reset"])
def test_stall_after_headers_and_connection_reset_are_retried(settings: Settings,
                                                              fake: FakeLLM, fault: str) -> None:
    fake.script("fragile", [fault, "ok"])
    results = run_batch(llm_settings(settings, fake), [job("fragile question"), job("fine")])
    assert [r.state for r in results] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    assert results[0].attempts == 2 and results[1].attempts == 1


@pytest.mark.parametrize(("fault", "words"), [
    ("empty", "empty answer"), ("nochoices", "empty choices"),
    ("filtered", "content filter"), ("context", "context too long"), ("404", "HTTP 404")])
def test_errors_of_the_job_fail_it_alone_without_retry(settings: Settings, fake: FakeLLM,
                                                       fault: str, words: str) -> None:
    fake.script("doomed", [fault])
    results = run_batch(llm_settings(settings, fake), [job("doomed question"), job("fine")])
    assert results[0].state is JobState.FAILED and results[0].attempts == 1
    assert results[0].error is not None and words in results[0].error
    assert results[1].state is JobState.SUCCEEDED
    assert len(fake.requests_for("doomed")) == 1


def test_a_truncated_200_is_retried_like_a_5xx(settings: Settings, fake: FakeLLM) -> None:
    fake.script("flaky-once", ["malformed", "ok"])
    fake.script("broken-always", ["malformed"])
    results = run_batch(llm_settings(settings, fake),
                        [job("flaky-once question"), job("broken-always question"), job("fine")])
    assert results[0].state is JobState.SUCCEEDED and results[0].attempts == 2
    assert results[1].state is JobState.FAILED and results[1].attempts == 4
    assert results[1].error is not None and "not JSON" in results[1].error
    assert "cut off" in results[1].error  # the raw body is kept
    assert results[2].state is JobState.SUCCEEDED and results[2].attempts == 1


def test_a_job_that_keeps_failing_ends_failed_after_max_attempts(settings: Settings,
                                                                 fake: FakeLLM) -> None:
    fake.script("broken", ["500"])
    results = run_batch(llm_settings(settings, fake), [job("broken question"), job("fine")])
    assert results[0].state is JobState.FAILED
    assert results[0].error is not None and "gave up after 4 attempts" in results[0].error
    assert len(fake.requests_for("broken")) == 4
    assert results[1].state is JobState.SUCCEEDED


def test_nothing_is_retried_past_the_deadline(settings: Settings, fake: FakeLLM) -> None:
    fake.script("late", ["503:retry-after=1.5"])
    results = run_batch(llm_settings(settings, fake), [job("late question", timeout_s=1.0)])
    assert results[0].state is JobState.FAILED
    assert results[0].error is not None and "deadline" in results[0].error
    assert len(fake.requests_for("late")) == 1


def test_a_batch_that_keeps_failing_is_split_and_the_poison_fails_alone(
        settings: Settings, fake: FakeLLM) -> None:
    # /v1/completions: the batch's prompts travel in one request; one poisons it.
    fake.script("poison", ["500"])
    s = llm_settings(settings, fake, openai_endpoint="completions")
    texts = [f"plain prompt {i}" for i in range(7)] + ["poison prompt"]
    results = run_batch(s, [job(t) for t in texts])
    states = {t: r.state for t, r in zip(texts, results, strict=True)}
    assert states.pop("poison prompt") is JobState.FAILED
    assert set(states.values()) == {JobState.SUCCEEDED}
    sizes = [len(x.body["prompt"]) for x in fake.seen]
    assert sizes[0] == 8 and min(sizes) == 1, f"never split: {sizes}"


def test_fallback_takes_over_while_a_deployment_cools_down(settings: Settings, fake: FakeLLM,
                                                           r: redis.Redis) -> None:
    fake.script('"model": "primary-model"', ["500"])
    s = llm_settings(settings, fake, cooldown_failures=2,
                     fallbacks={"openai|primary-model": ["openai|backup-model"]})
    results = run_batch(s, [job("question", model="primary-model")])
    assert results[0].state is JobState.SUCCEEDED
    assert results[0].model == "backup-model"
    assert [x.body["model"] for x in fake.seen] == ["primary-model"] * 2 + ["backup-model"]
    assert r.exists("pb:cooldown:openai|primary-model")


def test_prefix_strategy_sequential_and_warm_then_parallel(settings: Settings,
                                                           fake: FakeLLM) -> None:
    fake.delay_s = 0.1
    shared = "You are a meticulous reviewer of insurance claims. " * 4
    jobs = [job(shared + f"claim {i}") for i in range(4)]
    run_batch(llm_settings(settings, fake, openai_prefix_strategy="sequential"), jobs)
    seq = fake.seen[:]
    assert all(b.start >= a.end for a, b in itertools.pairwise(seq)), "overlapped"
    keys = {x.body.get("prompt_cache_key") for x in seq}
    assert len(keys) == 1 and next(iter(keys)), "one prompt_cache_key per batch"
    fake.seen.clear()
    run_batch(llm_settings(settings, fake, openai_prefix_strategy="warm_then_parallel"), jobs)
    first, *rest = sorted(fake.seen, key=lambda x: x.start)
    assert all(x.start >= first.end for x in rest), "the first request did not warm alone"
    assert max(x.start for x in rest) < min(x.end for x in rest), "the rest were not parallel"


def test_auto_strategy_asks_a_llama_cpp_server(settings: Settings, fake: FakeLLM) -> None:
    fake.props = True
    provider = create_provider("openai", llm_settings(settings, fake,
                                                      openai_prefix_strategy="auto"))
    assert provider.strategy.value == "sequential"  # type: ignore[attr-defined]
    provider.close()


def test_anthropic_marks_a_shared_system_prompt_and_retries_529(settings: Settings,
                                                                fake: FakeLLM) -> None:
    fake.script("overloaded", ["529", "ok"])
    system = "You are the claims assistant of Northwind Insurance. " * 10
    jobs = [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": f"claim {i} overloaded" if i == 0
                           else f"claim {i}"}],
             "provider": "anthropic", "model": "claude-test"} for i in range(3)]
    results = run_batch(llm_settings(settings, fake), jobs)
    assert [r.state for r in results] == [JobState.SUCCEEDED] * 3
    assert results[0].attempts == 2
    for seen in fake.seen[:3]:  # the batch's first call; the retry goes alone
        assert seen.path == "/v1/messages"
        assert seen.body["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert seen.headers["x-api-key"] == SECRET
    assert results[1].usage is not None and results[1].usage.cached_tokens == 100
    # Cache writes, which Anthropic bills apart, are counted apart (and in prompt_tokens).
    assert results[1].usage.cache_write_tokens == 24
    assert results[1].usage.prompt_tokens == 10 + 100 + 24


def test_rate_limit_waits_for_budget_shared_in_redis(settings: Settings, r: redis.Redis) -> None:
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        time.sleep(s)

    # 600 tokens a minute: 10 a second.
    s = settings.model_copy(update={"rate_limits": {"openai|m": {"rpm": 600, "tpm": 600}}})
    a = RateLimiter(r, s, sleep=sleep)
    b = RateLimiter(r, s, sleep=sleep)  # another worker
    assert a.acquire("openai|m", "t", requests=1, tokens=300, deadline=None)
    assert b.acquire("openai|m", "t", requests=1, tokens=300, deadline=None)
    assert slept == []  # the first minute's budget
    assert a.acquire("openai|m", "t", requests=1, tokens=5, deadline=None)
    assert 0.3 <= sum(slept) <= 1.5, slept  # 5 tokens at 10 a second
    assert not b.acquire("openai|m", "t", requests=1, tokens=300, deadline=time.time() + 1)
    assert a.fits("openai|m", 600, 600) and not a.fits("openai|m", 601, 10)


def test_a_worker_with_a_skewed_clock_does_not_refill_the_shared_bucket(
        settings: Settings, r: redis.Redis) -> None:
    s = settings.model_copy(update={"rate_limits": {"openai|m": {"tpm": 60}}})  # 1 a second
    honest = RateLimiter(r, s)
    ahead = RateLimiter(r, s, clock=lambda: time.time() + 3600)  # an hour fast
    assert honest.acquire("openai|m", "t", requests=1, tokens=60, deadline=None)
    # The bucket is empty: a clock an hour ahead must not find it refilled.
    assert not ahead.acquire("openai|m", "t", requests=1, tokens=30,
                             deadline=time.time() + 3600 + 5)
    assert not honest.acquire("openai|m", "t", requests=1, tokens=30,
                              deadline=time.time() + 5)


def test_api_keys_are_never_logged_stored_or_returned(settings: Settings, fake: FakeLLM,
                                                      r: redis.Redis, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fake.script("bad", ["401"])
    s = llm_settings(settings, fake)
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump())
    with caplog.at_level("DEBUG"):
        results = run_batch(s, [job("bad key"), job("good")])
    assert results[0].error is not None and "API key" in results[0].error
    assert SECRET not in caplog.text
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        dump = r.dump(key) or b""
        assert SECRET.encode() not in dump, f"{key} ({kind}) holds the key"
    db = Path(s.database_url.removeprefix("sqlite:///"))
    assert SECRET.encode() not in db.read_bytes()
    assert all(SECRET not in r.model_dump_json() for r in results)


@pytest.mark.parametrize("fault", ["context", "invalid"])
def test_a_4xx_for_a_list_of_prompts_is_split_until_the_poison_is_alone(
        settings: Settings, fake: FakeLLM, fault: str) -> None:
    fake.script("poison", [fault])
    s = llm_settings(settings, fake, openai_endpoint="completions")
    texts = [f"plain prompt {i}" for i in range(15)] + ["poison prompt"]
    results = run_batch(s, [job(t) for t in texts])
    states = {t: r.state for t, r in zip(texts, results, strict=True)}
    assert states.pop("poison prompt") is JobState.FAILED
    assert set(states.values()) == {JobState.SUCCEEDED}
    poison = results[-1]
    assert poison.error is not None and "HTTP 400" in poison.error
    sizes = [len(x.body["prompt"]) for x in fake.seen]
    assert sizes[0] == 16 and len(fake.requests_for("poison")) == 5, sizes  # 16, 8, 4, 2, 1


def test_good_answers_are_stored_while_a_poison_is_still_retried(settings: Settings,
                                                                 fake: FakeLLM) -> None:
    import threading

    fake.script("poison", ["500"])
    s = llm_settings(settings, fake, openai_endpoint="completions",
                     provider_retry_base_s=0.4, provider_retry_max_s=1.0)
    texts = [f"plain prompt {i}" for i in range(15)] + ["poison prompt"]
    snapshots: list[dict[str, int]] = []
    stop = threading.Event()
    store = JobStore(s.database_url)
    store.migrate()

    def watch() -> None:
        while not stop.is_set():
            snapshots.append(store.count_by_state())
            stop.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = run_batch(s, [job(t) for t in texts])
    finally:
        stop.set()
        watcher.join()
        store.close()
    assert results[-1].state is JobState.FAILED
    assert {"SUCCEEDED": 15, "QUEUED": 1} in snapshots, \
        "the good answers were stored only once the poison was final"


def test_a_dead_deployment_costs_one_request_per_attempt_not_one_per_job(
        settings: Settings, fake: FakeLLM) -> None:
    fake.script('"model": "dead-model"', ["503"])
    s = llm_settings(settings, fake, cooldown_failures=2,
                     fallbacks={"openai|dead-model": ["openai|backup-model"]})
    results = run_batch(s, [job(f"question {i}", model="dead-model") for i in range(30)],
                        warm=False)
    assert {r.state for r in results} == {JobState.SUCCEEDED}
    assert {r.model for r in results} == {"backup-model"}
    dead = [x for x in fake.seen if x.body["model"] == "dead-model"]
    assert len(dead) == 2, f"{len(dead)} requests went to the dead deployment"
    first, *rest = [x for x in fake.seen if x.body["model"] == "backup-model"]
    assert len(rest) == 29 and all(x.start >= first.end for x in rest), \
        "the untried fallback got the whole batch before one request answered"


def test_without_a_fallback_a_dead_deployment_fails_the_batch_after_its_attempts(
        settings: Settings, fake: FakeLLM) -> None:
    fake.script("question", ["503"])
    s = llm_settings(settings, fake)
    results = run_batch(s, [job(f"question {i}") for i in range(10)], warm=False)
    assert {r.state for r in results} == {JobState.FAILED}
    assert len(fake.seen) == s.provider_max_attempts
    assert all(r.error is not None and "kept failing" in r.error and "503" in r.error
               for r in results)


def test_a_lone_job_whose_long_system_prompt_others_share_is_marked_for_caching(
        settings: Settings, fake: FakeLLM) -> None:
    system = "You are the claims assistant of Northwind Insurance. " * 10
    one = {"messages": [{"role": "system", "content": system},
                        {"role": "user", "content": "claim 1"}],
           "provider": "anthropic", "model": "claude-test"}
    s = llm_settings(settings, fake)
    run_batch(s, [one], prefix_hint=1024)  # the scheduler: others pending share 1,024 chars
    assert fake.seen[-1].body["system"][0]["cache_control"] == {"type": "ephemeral"}
    run_batch(s, [one])  # nobody else shares it: no cache write paid for
    assert fake.seen[-1].body["system"] == system


def test_a_fallbacks_answer_is_cached_as_the_fallbacks_not_the_primarys(
        settings: Settings, fake: FakeLLM) -> None:
    fake.script('"model": "primary-model"', ["500"])
    s = llm_settings(settings, fake, cooldown_failures=2,
                     fallbacks={"openai|primary-model": ["openai|backup-model"]})
    asked = job("what is 2+2?", model="primary-model", params={"temperature": 0})
    [first] = run_batch(s, [asked])
    assert (first.state, first.model) == (JobState.SUCCEEDED, "backup-model")
    with Client(s) as client:
        # The same request for the primary is not answered by the fallback's answer...
        [(again, state)] = client.submit_many_states([asked])
        assert state is JobState.QUEUED and client.queue.results([again]) == [None]
        # ...while the same request for the fallback itself is.
        [(direct, state)] = client.submit_many_states([{**asked, "model": "backup-model"}])
        assert state is JobState.SUCCEEDED
        hit = client.result(direct, timeout=5)
        assert (hit.cache, hit.cache_source, hit.model) == ("exact", first.id, "backup-model")


def test_a_per_tenant_limit_charges_each_job_to_its_own_tenant(
        settings: Settings, fake: FakeLLM, r: redis.Redis) -> None:
    s = llm_settings(settings, fake, rate_limits={
        "openai|test-model": {"rpm": 100, "tpm": 1_000_000, "per_tenant": 1}},
        openai_endpoint="completions")  # the batch's prompts in one request
    results = run_batch(s, [job("acme asks one", tenant="acme"),
                            job("acme asks two", tenant="acme"),
                            job("globex asks", tenant="globex")])
    assert {x.state for x in results} == {JobState.SUCCEEDED}
    assert len(fake.seen) == 1  # one request carried both tenants' jobs

    def left(tenant: str) -> float:
        return float(r.hget(keys.rate_bucket(f"openai|test-model|{tenant}|requests"),
                            "tokens") or "nan")

    # Each tenant's bucket paid for its own jobs (refill since is a fraction of one).
    assert 97.9 <= left("acme") < 98.5
    assert 98.9 <= left("globex") < 99.5


def test_a_per_tenant_limit_splits_a_mixed_batch_only_when_a_tenants_share_is_too_big(
        settings: Settings, fake: FakeLLM, r: redis.Redis) -> None:
    # A job costs 1,004 tokens (4 of prompt, 1,000 to answer): two per tenant fit a
    # tenant's 3,000 a minute; the four together would not fit one bucket. (The sizes
    # keep each split's wait for budget under a second.)
    def ask(tenant: str, i: int) -> dict[str, object]:
        return job(f"{tenant} asks {i}", tenant=tenant, params={"max_tokens": 1000})

    limits = {"openai|test-model": {"rpm": 100, "tpm": 3000, "per_tenant": 1}}
    s = llm_settings(settings, fake, rate_limits=limits,
                     openai_endpoint="completions")  # the batch's prompts in one request
    mixed = [ask(t, i) for t in ("acme", "globex") for i in range(2)]
    assert {x.state for x in run_batch(s, mixed)} == {JobState.SUCCEEDED}
    assert len(fake.seen) == 1, "a mixed batch was split though each share fits its bucket"

    def left(tenant: str) -> float:
        return float(r.hget(keys.rate_bucket(f"openai|test-model|{tenant}|tokens"),
                            "tokens") or "nan")

    assert 3000 - 2 * 1004 <= left("acme") < 3000 - 2 * 1004 + 50  # refilled since: < 1 s
    assert 3000 - 2 * 1004 <= left("globex") < 3000 - 2 * 1004 + 50
    # One tenant's share alone too big for its bucket: split, as before.
    fake.seen.clear()
    assert {x.state for x in run_batch(s, [ask("initech", i) for i in range(3)])} == {
        JobState.SUCCEEDED}
    assert len(fake.seen) == 2
    # The same four jobs under one bucket for the deployment: the sum counts, split.
    fake.seen.clear()
    shared = llm_settings(settings, fake, openai_endpoint="completions", rate_limits={
        "openai|test-model": {"rpm": 100, "tpm": 4000}})
    assert {x.state for x in run_batch(shared, mixed)} == {JobState.SUCCEEDED}
    assert len(fake.seen) == 2

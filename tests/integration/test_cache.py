"""The result cache and coalescing, counted where the calls happen (the echo provider's
own call log) and where the results are stored."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import httpx
import pytest

from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from promptbatch.embedded import free_port
from tests.conftest import Procs, settings_env
from tests.helpers import poll, provider_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DET: dict[str, Any] = {"params": {"temperature": 0}}


def finals(client: Client, ids: list[str], timeout: float = 60) -> dict[str, Any]:
    poll(lambda: all(r is not None for r in client.queue.results(ids)), timeout=timeout,
         interval=0.05, what="every job to finish")
    return {r.id: r for r in client.queue.results(ids) if r is not None}


def calls(settings: Settings) -> int:
    return sum(provider_calls(settings.echo_call_log).values())


def test_a_repeat_is_answered_at_submit_without_any_provider_call(
        settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    worker = procs.worker(1)
    with Client(settings) as client:
        first = client.submit("What is the capital of France?", tenant="acme", **DET)
        assert client.result(first, timeout=30).cache is None
        assert calls(settings) == 1
        worker.terminate()  # nothing may be needed to answer the repeats
        worker.wait(30)
        again = client.submit_many_states([{"prompt": "What is the capital of France?",
                                            "tenant": "acme", **DET}])
        assert again[0][1] is JobState.SUCCEEDED  # answered at submit
        res = client.result(again[0][0], timeout=5)
        assert (res.state, res.cache, res.cache_source) == (JobState.SUCCEEDED, "exact", first)
        assert res.text == "echo: What is the capital of France?"
        assert client.store.get(again[0][0]).state is JobState.SUCCEEDED  # type: ignore[union-attr]
        # Not for another tenant, another parameter, or a job that says no.
        others = [client.submit("What is the capital of France?", tenant="globex", **DET),
                  client.submit("What is the capital of France?", tenant="acme",
                                params={"temperature": 0, "max_tokens": 5}),
                  client.submit("What is the capital of France?", tenant="acme",
                                cache="off", **DET)]
        assert client.queue.results(others) == [None, None, None]
        assert calls(settings) == 1


def test_the_api_answers_a_repeat_from_the_cache_and_purges_by_tenant(
        settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    procs.worker(1)
    port = free_port()
    api = procs.spawn("api", "--port", str(port), PROMPTBATCH_API_KEYS=json.dumps(
        {"key-a": "acme", "key-b": "globex"}))
    base = f"http://127.0.0.1:{port}"
    poll(lambda: _status(f"{base}/readyz") == 200, timeout=60, interval=0.1, what="the API",
         proc=api)
    body = {"prompt": "Name three primes", **DET}
    a = {"Authorization": "Bearer key-a"}
    first = httpx.post(f"{base}/v1/jobs", json=body, headers=a).json()
    assert first["state"] == "QUEUED"
    done = httpx.get(f"{base}/v1/jobs/{first['id']}/result", params={"wait": 30}, headers=a,
                     timeout=40).json()
    assert done["state"] == "SUCCEEDED"
    hit = httpx.post(f"{base}/v1/jobs", json=body, headers=a).json()
    assert hit["state"] == "SUCCEEDED"
    view = httpx.get(f"{base}/v1/jobs/{hit['id']}", headers=a).json()
    assert view["result"]["cache"] == "exact" and view["result"]["cache_source"] == first["id"]
    # Tenant B never gets tenant A's answer, and may not purge A's cache.
    b = {"Authorization": "Bearer key-b"}
    other = httpx.post(f"{base}/v1/jobs", json=body, headers=b).json()
    assert other["state"] == "QUEUED"
    assert httpx.delete(f"{base}/v1/cache", params={"tenant": "acme"},
                        headers=b).status_code == 403
    purged = httpx.delete(f"{base}/v1/cache", headers=a).json()
    assert purged["purged"] == 1
    after = httpx.post(f"{base}/v1/jobs", json=body, headers=a).json()
    assert after["state"] == "QUEUED"
    for job, auth in ((other, b), (after, a)):
        res = httpx.get(f"{base}/v1/jobs/{job['id']}/result", params={"wait": 30},
                        headers=auth, timeout=40).json()
        assert res["state"] == "SUCCEEDED" and res.get("cache") is None
    assert calls(settings) == 3  # the first, tenant B's, and the one after the purge


def test_identical_concurrent_requests_make_one_provider_call(settings: Settings,
                                                              procs: Procs) -> None:
    procs.scheduler()
    ids: list[str] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        with Client(settings) as client:
            got = [client.submit("Explain coalescing in one line", tenant="acme", **DET)
                   for _ in range(n)]
        with lock:
            ids.extend(got)

    threads = [threading.Thread(target=submit, args=(10,)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 100
    with Client(settings) as client:
        follower = next(j for j in ids if client.queue.states([j])[0] == "FOLLOWING")
        assert client.cancel(follower) is JobState.CANCELLED  # alone
        procs.worker(2)  # the work starts only now: all 100 were pending together
        results = finals(client, ids)
    assert calls(settings) == 1
    states = [r.state for r in results.values()]
    assert states.count(JobState.SUCCEEDED) == 99 and states.count(JobState.CANCELLED) == 1
    leader = next(r for r in results.values() if r.cache is None
                  and r.state is JobState.SUCCEEDED)
    coalesced = [r for r in results.values() if r.cache == "coalesced"]
    assert len(coalesced) == 98 and all(r.cache_source == leader.id for r in coalesced)
    assert all(r.text == "echo: Explain coalescing in one line" for r in coalesced)


def test_followers_of_a_leader_that_ends_without_an_answer_run_on_their_own(
        settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    with Client(settings) as client:
        ids = [client.submit("Who wins?", tenant="acme", **DET) for _ in range(4)]
        leader = ids[0]
        assert client.queue.states(ids[1:]) == ["FOLLOWING"] * 3
        assert client.cancel(leader) is JobState.CANCELLED
        procs.worker(1)
        results = finals(client, ids)
    assert results[leader].state is JobState.CANCELLED
    assert all(results[j].state is JobState.SUCCEEDED and results[j].cache != "coalesced"
               for j in ids[1:])
    # Each ran on its own, once; the cancelled leader never reached the provider.
    assert provider_calls(settings.echo_call_log) == Counter(ids[1:])


def test_expired_results_are_never_cached(settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    procs.worker(1)
    with Client(settings) as client:
        first = client.submit("x" * 50, tenant="acme", timeout_s=0.001, **DET)
        assert client.result(first, timeout=30).state is JobState.EXPIRED
        again = client.submit_many_states([{"prompt": "x" * 50, "tenant": "acme", **DET}])
        assert again[0][1] is JobState.QUEUED
        assert client.result(again[0][0], timeout=30).cache is None


def test_failed_results_are_never_cached(settings: Settings, r: Any) -> None:
    from config import keys
    from jobs import cachekey
    from tests.fake_llm import FakeServer
    from tests.integration.test_providers import llm_settings, run_batch

    with FakeServer() as fake:
        fake.script("too long", ["context"])
        s = llm_settings(settings, fake)
        asked = {"prompt": "too long for the model", "provider": "openai",
                 "model": "test-model", **DET}
        [failed] = run_batch(s, [asked])
        assert failed.state is JobState.FAILED and failed.attempts == 1
        with Client(s) as client:
            key = cachekey.exact_key(client.spec(failed.id), s)
            assert not r.exists(keys.cache_entry(key))  # where it would have gone
            [(again, state)] = client.submit_many_states([asked])
            assert state is JobState.QUEUED and client.queue.results([again]) == [None]


def test_the_purge_command_empties_a_tenants_cache(settings: Settings, procs: Procs) -> None:
    procs.scheduler()
    procs.worker(1)
    with Client(settings) as client:
        first = client.submit("Cache me", tenant="acme", **DET)
        client.result(first, timeout=30)
        out = subprocess.run([sys.executable, "-m", "promptbatch", "cache", "purge",
                              "--tenant", "acme"], env=settings_env(settings),
                             capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == "purged 1 entries"
        again = client.submit_many_states([{"prompt": "Cache me", "tenant": "acme", **DET}])
        assert again[0][1] is JobState.QUEUED


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_a_similar_prompt_is_answered_by_the_semantic_cache_but_not_its_negation(
        settings: Settings, procs: Procs) -> None:
    env = {"PROMPTBATCH_CACHE_SEMANTIC_TENANTS": json.dumps(["acme"]),
           "PROMPTBATCH_CACHE_SEMANTIC_THRESHOLD": "0.85"}
    sched_port = free_port()
    procs.scheduler(PROMPTBATCH_METRICS_PORT=str(sched_port), **env)
    procs.worker(1, **env)
    semantic: dict[str, Any] = {"cache": "semantic", **DET}
    with Client(settings) as client:
        first = client.submit("How do I enable two-factor authentication on my account?",
                              tenant="acme", **semantic)
        assert client.result(first, timeout=30).cache is None
        similar = client.submit("How can I enable two-factor authentication on my account?",
                                tenant="acme", **semantic)
        negated = client.submit("How do I disable two-factor authentication on my account?",
                                tenant="acme", **semantic)
        elsewhere = client.submit("How can I enable two-factor authentication on my account?",
                                  tenant="globex", **semantic)
        hit = client.result(similar, timeout=30)
        assert (hit.cache, hit.cache_source) == ("semantic", first)
        assert hit.cache_similarity is not None and hit.cache_similarity >= 0.85
        assert hit.text == "echo: How do I enable two-factor authentication on my account?"
        assert client.result(negated, timeout=30).cache is None  # the guard refused
        assert client.result(elsewhere, timeout=30).cache is None  # not globex's to share
    ran = provider_calls(settings.echo_call_log)
    assert set(ran) == {first, negated, elsewhere}
    url = f"http://127.0.0.1:{sched_port}/metrics"

    def scraped() -> str:
        t = httpx.get(url, timeout=10).text
        return t if 'promptbatch_cache_hits_total{class="normal",kind="semantic"' in t else ""

    text = poll(scraped, timeout=10, interval=0.2, what="the cluster counters to show the hit")
    assert 'promptbatch_cache_semantic_lookups_total{outcome="hit"} 1.0' in text
    assert 'promptbatch_cache_semantic_lookups_total{outcome="guarded"} 1.0' in text


def test_a_partition_keeps_within_its_entry_and_byte_bounds(r: Any) -> None:
    from config import keys
    from jobs.queue import RedisQueue

    q = RedisQueue(r)
    part = "acme|echo|echo-1|"
    for i in range(5):
        q.cache_put(f"{part}:{i}", part, "x" * 100, ttl_s=3600, now=1000.0 + i,
                    max_entries=3, max_bytes=10_000)
    alive = [i for i in range(5) if r.exists(keys.cache_entry(f"{part}:{i}"))]
    assert alive == [2, 3, 4]  # the oldest went first
    assert int(r.get(keys.cache_bytes(part))) == 300
    q.cache_put(f"{part}:big", part, "y" * 250, ttl_s=3600, now=1010.0, max_entries=10,
                max_bytes=400)
    alive = [k for k in ("2", "3", "4", "big") if r.exists(keys.cache_entry(f"{part}:{k}"))]
    assert alive == ["4", "big"] and int(r.get(keys.cache_bytes(part))) == 350
    # An entry past its time leaves the accounts when the next one is stored.
    q.cache_put(f"{part}:late", part, "z" * 10, ttl_s=5, now=2000.0, max_entries=10,
                max_bytes=10_000)
    assert int(r.get(keys.cache_bytes(part))) == 10


def test_the_semantic_index_is_rebuilt_from_redis(settings: Settings) -> None:
    from jobs import cache
    from jobs.models import JobRequest, JobResult
    from jobs.queue import RedisQueue, connect
    from jobs.validation import resolve
    from scheduler.embedders import create_embedder
    from scheduler.semantic import SemanticCache

    s = settings.model_copy(update={"cache_semantic_tenants": ["acme"],
                                    "cache_semantic_threshold": 0.85})
    r = connect(s.redis_url)
    embedder = create_embedder("hashed", dim=s.embedding_dim)

    def spec(job_id: str, text: str) -> Any:
        return resolve(JobRequest(prompt=text, tenant="acme", cache="semantic", **DET),
                       job_id=job_id, now=1.0, settings=s)

    first = spec("j1", "How do I enable two-factor authentication on my account?")
    assert SemanticCache(r, s, embedder).lookup([first]).hits == {}  # a miss: remembered
    cache.put(RedisQueue(r), s, [JobResult(id="j1", state=JobState.SUCCEEDED, text="Go to "
                                           "settings.", provider="echo", model="echo-1")],
              {"j1": first})
    restarted = SemanticCache(r, s, embedder)  # a scheduler that becomes active
    assert restarted.load() == 1
    found = restarted.lookup([spec("j2", "How can I enable two-factor authentication on my "
                                         "account?")])
    assert found.hits["j2"].entry.source == "j1" and found.guarded == 0
    refused = restarted.lookup([spec("j3", "How do I disable two-factor authentication on my "
                                           "account?")])
    assert refused.hits == {} and refused.guarded == 1
    r.close()

"""The workers' side of anomaly detection, against a real HTTP server on loopback and a
real Redis: a deployment the scheduler avoids (``errors_high``) sends its calls to the
fallback but for a probe share, and a failed probe moves on at once, without a backoff;
each batch's end tells the scheduler its tokens, its calls per deployment with their
failures, and where it ran."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Sequence

import redis

from config import keys
from config.settings import Settings
from jobs.models import JobResult
from jobs.queue import RedisQueue, connect
from jobs.store import JobStore
from producers.client import Client
from tests.fake_llm import FakeLLM
from tests.integration.test_providers import fake, job, llm_settings  # noqa: F401
from workers.batch import BatchRunner
from workers.providers import Provider, create_provider
from workers.retry import Health, ProviderCaller

PRIMARY, SPARE = "openai|primary-model", "openai|backup-model"


class Scripted(random.Random):
    """``random()`` answers from a script (then 0.99: no probe)."""

    def __init__(self, draws: Sequence[float]) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0) if self.draws else 0.99


def run(s: Settings, jobs: list[dict[str, object]], draws: Sequence[float] = (),
        ) -> tuple[list[JobResult], dict[str, str]]:
    """Run the jobs as one batch in this process; their results and the batch's end
    event."""
    providers: dict[str, Provider] = {}

    def provider_for(name: str) -> Provider:
        if name not in providers:
            providers[name] = create_provider(name, s)
        return providers[name]

    r = connect(s.redis_url)
    with Client(s) as client:
        ids = client.submit_many(jobs)
        for dep in (PRIMARY, SPARE):
            client.r.set(keys.healthy(dep), "1", ex=60)
        batch_id = str(uuid.uuid4())
        assert client.queue.acquire_lease("test-scheduler", 30)
        assert client.queue.claim("test-scheduler", batch_id, "{}",
                                  [(i, client.spec(i).tenant) for i in ids], time.time(), 2)
        caller = ProviderCaller(s, provider_for, health=Health(r, s), rng=Scripted(draws))
        runner = BatchRunner(s, RedisQueue(r), JobStore(s.database_url), provider_for,
                             caller=caller)
        runner.run(batch_id, "send-1", ids)
        events = [f for _, f in r.xrange(keys.EVENTS) if f.get("done") == batch_id]
        return [client.result(i, timeout=5) for i in ids], events[0]


def test_an_avoided_deployment_sends_its_calls_to_the_fallback_but_for_a_probe(
        settings: Settings, fake: FakeLLM, r: redis.Redis) -> None:  # noqa: F811
    s = llm_settings(settings, fake, fallbacks={PRIMARY: [SPARE]})
    jobs = [job(f"question {i}", model="primary-model") for i in range(4)]
    results, event = run(s, jobs)  # not avoided: the primary answers
    assert {x.model for x in results} == {"primary-model"}
    assert "ran_on" not in event
    assert json.loads(event["calls"]) == [[PRIMARY, -1, 4, 0]]
    assert (int(event["completion_tokens"]), int(event["prompt_tokens"]),
            int(event["cached_tokens"])) == (4 * 4, 4 * 12, 4 * 8)  # the server's usage
    r.set(keys.avoid(PRIMARY), "errors_high|...", ex=30)
    fake.seen.clear()
    results, event = run(s, jobs)  # avoided: the fallback answers
    assert {x.model for x in results} == {"backup-model"}
    assert {x.body["model"] for x in fake.seen} == {"backup-model"}
    assert event["ran_on"] == SPARE and event["deployment"] == PRIMARY
    assert json.loads(event["calls"]) == [[SPARE, -1, 4, 0]]
    fake.seen.clear()
    results, _ = run(s, jobs, draws=[0.05])  # under the probe share: the primary
    assert {x.body["model"] for x in fake.seen} == {"primary-model"}


def test_a_failed_probe_of_an_avoided_deployment_moves_to_the_fallback_at_once(
        settings: Settings, fake: FakeLLM, r: redis.Redis) -> None:  # noqa: F811
    fake.script('"model": "primary-model"', ["500"])
    s = llm_settings(settings, fake, fallbacks={PRIMARY: [SPARE]},
                     provider_retry_base_s=2.0, cooldown_failures=10)
    r.set(keys.avoid(PRIMARY), "errors_high|...", ex=30)
    results, event = run(s, [job("question", model="primary-model")], draws=[0.0])
    assert [x.model for x in results] == ["backup-model"]
    probe, moved = fake.seen
    assert (probe.body["model"], moved.body["model"]) == ("primary-model", "backup-model")
    assert moved.start - probe.end < 1.0  # no backoff (it would be at least 2 s)
    assert sorted(json.loads(event["calls"])) == [[SPARE, -1, 1, 0], [PRIMARY, -1, 1, 1]]
    # Without the anomaly the same failure waits its backoff before the next call.
    r.delete(keys.avoid(PRIMARY))
    fake.seen.clear()
    fake.script('"model": "primary-model"', ["500", "ok"])
    run(s, [job("question", model="primary-model")])
    first, second = fake.seen
    assert second.start - first.end >= 2.0

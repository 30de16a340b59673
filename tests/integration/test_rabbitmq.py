"""RabbitMQ as the broker of the batch tasks (``PROMPTBATCH_BROKER_URL=amqp://...``), with
job state, results and the cache in Redis: the pipeline, and the fault cases that involve
the broker, on a real RabbitMQ server (Debian's ``rabbitmq-server``, which ``.ci/run``
installs). Each test has a virtual host of its own on one server per test process."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from tests.conftest import Procs
from tests.faults import test_faults
from tests.helpers import poll, provider_calls
from tests.rabbit import RabbitServer, bindir

pytestmark = [
    pytest.mark.integration, pytest.mark.slow, pytest.mark.faults,
    pytest.mark.xdist_group("rabbitmq"),
    pytest.mark.skipif(bindir() is None, reason="RabbitMQ is not installed here "
                       "(apt-get install rabbitmq-server; .ci/run installs it)"),
]


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitServer]:
    server = RabbitServer().start()
    yield server
    server.stop()


@pytest.fixture
def amqp_url(rabbit: RabbitServer) -> str:
    return rabbit.vhost()


@pytest.fixture
def rprocs(procs: Procs, amqp_url: str) -> Procs:
    """The test's processes, with the batch tasks going through RabbitMQ."""
    procs.extra["PROMPTBATCH_BROKER_URL"] = amqp_url
    return procs


def test_jobs_run_once_each_through_rabbitmq_and_the_broker_leaves_nothing_in_redis(
        settings: Settings, rprocs: Procs, r: redis.Redis, rabbit: RabbitServer,
        amqp_url: str) -> None:
    rprocs.scheduler()
    rprocs.worker(2)
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"ticket {i}: classify it",
                                  "priority": ("high", "normal", "low")[i % 3]}
                                 for i in range(300))
        results = list(client.results(ids, timeout=120))
    assert {x.state for x in results} == {JobState.SUCCEEDED} and len(results) == 300
    assert provider_calls(settings.echo_call_log) == dict.fromkeys(ids, 1)
    # The tasks went through RabbitMQ's durable class queues, now empty; Redis holds no
    # broker queue and no unacknowledged task.
    depths = rabbit.queue_depths(amqp_url)
    assert set(keys.QUEUES) <= set(depths), depths
    assert all(depths[q] == (0, 0) for q in keys.QUEUES), depths
    assert not any(r.exists(q) for q in keys.QUEUES)
    assert not r.exists("unacked") and not r.exists("unacked_index")


def test_a_killed_workers_batch_is_delivered_again_at_once(
        settings: Settings, rprocs: Procs, r: redis.Redis) -> None:
    """With Redis as broker a lost worker's task waits out the visibility timeout (360 s);
    RabbitMQ gives it back as soon as the worker's connection closes."""
    rprocs.scheduler()
    doomed = rprocs.worker(concurrency=1, name="doomed")
    rprocs.worker(concurrency=1, name="survivor")
    with Client(settings) as client:
        ids = client.submit_many({"prompt": f"job {i} [echo:sleep=2]"} for i in range(2))
        poll(lambda: "RUNNING" in client.queue.states(ids), what="a batch to start")
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        killed = time.monotonic()
        test_faults.assert_exactly_one_final_result(client, ids, r)
        took = time.monotonic() - killed
    assert took < 30 < settings.visibility_timeout_s, took


def test_a_pool_process_killed_during_a_call(settings: Settings, rprocs: Procs,
                                             r: redis.Redis) -> None:
    test_faults.test_1_sigkill_of_a_pool_process_during_a_call(settings, rprocs, r)


def test_a_warm_shutdown_with_running_and_reserved_tasks(settings: Settings, rprocs: Procs,
                                                         r: redis.Redis) -> None:
    test_faults.test_4_sigterm_warm_shutdown_with_running_and_reserved_tasks(
        settings, rprocs, r)


def test_a_poison_batch_is_split_and_its_poison_job_fails_alone(
        settings: Settings, rprocs: Procs, r: redis.Redis) -> None:
    test_faults.test_5_a_poison_job_fails_alone_after_killing_the_worker(settings, rprocs, r)


def test_a_broker_restart_under_load_loses_no_batch(
        settings: Settings, rprocs: Procs, r: redis.Redis, rabbit: RabbitServer) -> None:
    rprocs.scheduler()
    rprocs.worker(2)
    with Client(settings) as client:
        # About 20 s of work (26 batches of 1.5 s on 2 processes): the broker still holds
        # batches when it is restarted, however slowly rabbitmqctl answers (on a loaded
        # machine each call starts an Erlang VM for seconds; half this work once ended
        # before the first answer).
        ids = client.submit_many({"prompt": f"job {i} [echo:sleep=1.5]", "priority": "low"}
                                 for i in range(800))
        poll(lambda: "RUNNING" in client.queue.states(ids), what="batches to run")

        def in_the_broker() -> dict[str, tuple[int, int]] | None:
            depths = rabbit.queue_depths(str(rprocs.extra["PROMPTBATCH_BROKER_URL"]))
            return depths if sum(r + u for r, u in depths.values()) > 0 else None

        held = poll(in_the_broker, timeout=30, interval=0.2, what="batches in the broker")
        running = {j for j, s in zip(ids, client.queue.states(ids), strict=True)
                   if s in ("SCHEDULED", "RUNNING")}
        rabbit.restart()
        test_faults.assert_exactly_one_final_result(client, ids, r)
    # A batch running while the broker was away may be delivered again (RabbitMQ gives
    # back what was not acknowledged); nothing else runs twice, nothing is lost.
    calls = provider_calls(settings.echo_call_log)
    assert set(calls) == set(ids)
    repeated = {j for j, n in calls.items() if n > 1}
    print(f"\nbroker restart: {held} held by the broker, {len(running)} jobs claimed or "
          f"running, {len(repeated)} called twice")
    assert len(repeated) <= len(running) + 2 * settings.max_batch_size, repeated

"""What an operator sees: each process's /metrics after a known workload, the status
overview, and Flower in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from jobs.models import JobState
from producers.client import Client
from promptbatch.embedded import free_port
from tests.conftest import Procs, settings_env
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, by sample name, parsed as Prometheus does."""
    text = httpx.get(url, timeout=10).text
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for lab, v in samples.get(name, [])
               if all(lab.get(k) == want for k, want in labels.items()))


def by(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """Sum of ``name`` per value of ``label``."""
    out: dict[str, float] = defaultdict(float)
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == want for k, want in labels.items()):
            out[lab[label]] += v
    return dict(out)


def wait_final(settings: Settings, ids: list[str]) -> None:
    with Client(settings) as client:
        poll(lambda: all(r is not None for r in client.queue.results(ids)), timeout=60,
             interval=0.1, what="every job to finish")
        states = {r.state for r in client.queue.results(ids) if r is not None}
        assert states == {JobState.SUCCEEDED}


def test_each_process_counts_a_known_workload_once(settings: Settings, procs: Procs) -> None:
    sched_port, worker_port, api_port = free_port(), free_port(), free_port()
    procs.scheduler(PROMPTBATCH_METRICS_PORT=str(sched_port))
    procs.worker(2, name="m", PROMPTBATCH_METRICS_PORT=str(worker_port))
    api = procs.spawn("api", "--port", str(api_port), "--workers", "2",
                      PROMPTBATCH_API_KEYS=json.dumps({"key-a": "team-a"}))
    base = f"http://127.0.0.1:{api_port}"
    poll(lambda: _ok(f"{base}/readyz"), timeout=60, interval=0.1, what="the API", proc=api)

    # 20 jobs over HTTP (10 critical with a deadline, 10 bulk without), 30 normal ones with
    # a deadline from the Python client: the cluster's counters must see all 50, once.
    ids: list[str] = []
    with httpx.Client(base_url=base, headers={"Authorization": "Bearer key-a"}) as http:
        for i in range(20):
            body = ({"prompt": f"critical question {i}", "priority": "critical",
                     "timeout_s": 120} if i % 2 == 0 else
                    {"prompt": f"bulk question {i}", "priority": "bulk"})
            resp = http.post("/v1/jobs", json=body)
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
    with Client(settings) as client:
        ids += client.submit_many([{"prompt": f"normal question {i}", "timeout_s": 120}
                                   for i in range(30)])
    wait_final(settings, ids)

    sched_url = f"http://127.0.0.1:{sched_port}/metrics"
    # The overview refreshes every second: wait until it shows nothing pending or in flight.
    poll(lambda: total(scrape(sched_url), "promptbatch_jobs_finished_total") == 50
         and total(scrape(sched_url), "promptbatch_jobs_pending") == 0
         and total(scrape(sched_url), "promptbatch_batches_in_flight") == 0,
         timeout=30, interval=0.2, what="the scheduler's metrics to show the work done")
    sched = scrape(sched_url)
    assert by(sched, "promptbatch_jobs_submitted_total", "class") == {
        "critical": 10, "normal": 30, "bulk": 10}
    assert by(sched, "promptbatch_jobs_finished_total", "state") == {"SUCCEEDED": 50}
    assert total(sched, "promptbatch_deadline_misses_total") == 0
    batches = total(sched, "promptbatch_batches_sent_total")
    assert batches >= 3  # three classes never share a batch
    assert total(sched, "promptbatch_batch_size_count") == batches
    assert total(sched, "promptbatch_batch_size_sum") == 50  # every job in one batch
    assert total(sched, "promptbatch_deadline_slack_seconds_count") == 40
    assert total(sched, "promptbatch_deadline_slack_seconds_bucket", le="0.0") == 0
    assert total(sched, "promptbatch_workers") == 1
    assert total(sched, "promptbatch_worker_slots") == 2
    assert total(sched, "promptbatch_scheduler_active") == 1
    assert total(sched, "promptbatch_plan_duration_seconds_count") >= 1

    # The worker's pool processes write their values to files; its parent sums them.
    work = scrape(f"http://127.0.0.1:{worker_port}/metrics")
    assert by(work, "promptbatch_queue_wait_seconds_count", "class") == {
        "critical": 10, "normal": 30, "bulk": 10}
    assert total(work, "promptbatch_job_latency_seconds_count", state="SUCCEEDED") == 50
    assert total(work, "promptbatch_job_latency_seconds_bucket", le="3600.0") == 50
    assert total(work, "promptbatch_provider_requests_total", outcome="ok") == 50
    assert total(work, "promptbatch_provider_requests_total") == 50
    assert total(work, "promptbatch_worker_batches_total", outcome="ran") == batches
    assert total(work, "promptbatch_prompt_tokens_total", kind="computed") > 0

    # The API with two uvicorn processes: /metrics of either sums both.
    web = scrape(f"{base}/metrics")
    assert total(web, "promptbatch_http_requests_total", method="POST", route="/v1/jobs",
                 status="201") == 20

    # The overview from another terminal: the same figures.
    env = settings_env(settings)
    raw = subprocess.run([sys.executable, "-m", "promptbatch", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    view = json.loads(raw)
    rows = {row["class"]: row for row in view["classes"]}
    assert {c: rows[c]["finished_last_min"] for c in ("critical", "normal", "bulk")} == {
        "critical": 10, "normal": 30, "bulk": 10}
    assert all(row["pending"] == 0 and row["missed_last_min"] == 0 for row in rows.values())
    assert (view["workers"], view["slots"]) == (1, 2)
    assert view["desired_slots"] >= 0 and view["throughput"] > 0
    shown = subprocess.run([sys.executable, "-m", "promptbatch", "status"], env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "workers 1 with 2 slots" in shown and "critical" in shown


def test_status_without_a_scheduler_says_what_to_start(settings: Settings) -> None:
    out = subprocess.run([sys.executable, "-m", "promptbatch", "status"],
                         env=settings_env(settings), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert "start `promptbatch scheduler`" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr



@pytest.mark.parametrize(("env", "said"), [
    ({"PROMPTBATCH_ANOMALY_DETECTION": "false"},
     "anomalies: off (PROMPTBATCH_ANOMALY_DETECTION=false on the active scheduler)"),
    ({"PROMPTBATCH_ANOMALY_ACTIONS_OFF": '["errors_high", "deadline_risk"]'},
     "actions off: deadline_risk, errors_high"),
])
def test_status_says_when_the_scheduler_watches_nothing_or_acts_on_less(
        settings: Settings, procs: Procs, env: dict[str, str], said: str) -> None:
    from config import keys
    from jobs.queue import connect

    procs.scheduler(**env)
    r = connect(settings.redis_url)
    poll(lambda: r.get(keys.OVERVIEW), timeout=30, what="an overview")
    r.close()
    out = subprocess.run([sys.executable, "-m", "promptbatch", "status"],
                         env=settings_env(settings), capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert said in " ".join(out.split()), out
    assert ("learned baselines" in out) is ("ACTIONS_OFF" in next(iter(env))), out

def test_flower_refuses_to_listen_openly_without_a_login(settings: Settings) -> None:
    out = subprocess.run([sys.executable, "-m", "promptbatch", "flower", "--address",
                          "0.0.0.0", "--port", str(free_port())],
                         env=settings_env(settings), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert "--basic-auth" in out.stderr + out.stdout and "Traceback" not in out.stderr


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def page_in_browser(url: str) -> str:
    """The page's DOM after its scripts ran, in headless Chromium."""
    browser = chromium()
    assert browser is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=8000", "--dump-dom", url],
            capture_output=True, text=True, timeout=90, check=True).stdout


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_flower_shows_batches_by_class_and_size_behind_its_login(settings: Settings,
                                                                  procs: Procs) -> None:
    procs.scheduler()
    procs.worker(2, name="f")
    port = free_port()
    flower = procs.spawn("flower", "--port", str(port), "--basic-auth", "ops:s3cret")
    url = f"http://127.0.0.1:{port}"
    poll(lambda: _status(f"{url}/healthcheck") == 200, timeout=60, interval=0.2,
         what="Flower", proc=flower)
    marker = "private-prompt-text"
    with Client(settings) as client:
        ids = client.submit_many([{"prompt": f"{marker} {i} " + "shared context " * 20,
                                   "priority": "critical" if i < 8 else "low"}
                                  for i in range(40)])
    wait_final(settings, ids)

    def tasks() -> dict[str, dict[str, object]]:
        return dict(httpx.get(f"{url}/api/tasks", auth=("ops", "s3cret"), timeout=10).json())

    poll(lambda: sum(1 for t in tasks().values() if t["state"] == "SUCCESS") >= 2
         and all(t["state"] == "SUCCESS" for t in tasks().values()),
         timeout=60, interval=0.2, what="Flower to see every batch succeed")
    seen = tasks()

    dom = page_in_browser(f"http://ops:s3cret@127.0.0.1:{port}/tasks")
    assert "promptbatch.process_batch" in dom
    for task in seen.values():  # every row: class by name, size, deployment; its result
        kwargs, result = str(task["kwargs"]), str(task["result"])
        size = int(kwargs.split(" batch of ", 1)[1].split()[0])
        assert kwargs.split(" batch of ")[0] in ("critical", "low"), kwargs
        assert f"batch of {size} for echo|echo-1" in dom
        assert f"'succeeded': {size}" in result and f"'succeeded': {size}" in dom
    assert "critical batch of" in dom and "low batch of" in dom
    assert marker not in dom  # no prompt text
    assert all(str(t["kwargs"]).count("...") == 0 for t in seen.values())  # nothing cut
    assert marker not in page_in_browser(f"http://127.0.0.1:{port}/tasks")  # no login
    assert "process_batch" not in page_in_browser(f"http://127.0.0.1:{port}/tasks")

    # Task history survives a restart of Flower.
    flower.terminate()
    flower.wait(30)
    flower = procs.spawn("flower", "--port", str(port), "--basic-auth", "ops:s3cret")
    poll(lambda: _status(f"{url}/healthcheck") == 200, timeout=60, interval=0.2,
         what="Flower to restart", proc=flower)
    assert set(tasks()) >= set(seen)


def _ok(url: str) -> bool:
    return _status(url) == 200


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0

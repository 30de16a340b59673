"""Bulk at size, in bounded memory: `promptbatch run` on a large generated file, and the
Batch API with a 50,000-line input file (real processes; the `load` group, run alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from config.settings import Settings
from promptbatch.embedded import free_port
from tests.conftest import Procs
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.load]


def _generate(path: Path, lines: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            fh.write(json.dumps({"id": f"r{i}", "priority": "bulk", "prompt":
                                 f"Template {i % 50}: reply to the customer about order {i}, "
                                 "politely and in one short paragraph."}) + "\n")


def _peak_rss_of_run(src: Path, data: Path, window: int) -> tuple[int, int]:
    """(peak RSS of the `run` process in MB, output lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env["PROMPTBATCH_DATA_DIR"] = str(data)
    out = src.with_suffix(".out.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "promptbatch", "run", str(src), "--out",
                             str(out), "--provider", "echo", "--window", str(window)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    me = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)  # sampling the process, not waiting for a result
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    return peak // 2**20, sum(1 for _ in out.open("rb"))


@pytest.mark.timeout(900)
def test_the_run_process_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    _generate(small, 10_000)
    _generate(large, 100_000)
    small_peak, small_lines = _peak_rss_of_run(small, tmp_path / "data-small", 5_000)
    large_peak, large_lines = _peak_rss_of_run(large, tmp_path / "data-large", 5_000)
    assert (small_lines, large_lines) == (10_000, 100_000)
    print(f"\nrun process peak RSS: {small_peak} MB at 10,000 lines, {large_peak} MB at "
          "100,000")
    assert large_peak <= small_peak * 1.2, (small_peak, large_peak)


@pytest.mark.timeout(900)
def test_a_50000_line_batch_file_completes_with_the_api_in_bounded_memory(
        settings: Settings, procs: Procs, tmp_path: Path) -> None:
    from openai import OpenAI

    procs.scheduler()
    procs.worker(2)
    port = free_port()
    api = procs.spawn("api", "--port", str(port),
                      PROMPTBATCH_API_KEYS=json.dumps({"key-a": "acme"}),
                      PROMPTBATCH_MAX_PENDING_PER_TENANT="200000")
    poll(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), timeout=60, interval=0.1,
         what="the API", proc=api)
    src = tmp_path / "batch.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i in range(50_000):
            fh.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": {
                                     "model": "echo-1", "messages": [
                                         {"role": "user",
                                          "content": f"Translate item {i} to French"}]}})
                     + "\n")
    base = psutil.Process(api.pid).memory_info().rss
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process(api.pid)
        while not done.is_set():
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in
                                       [me, *me.children(recursive=True)]))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="key-a", max_retries=0,
                    timeout=600)
    started = time.monotonic()
    uploaded = client.files.create(file=src.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    created = time.monotonic() - started
    final = poll(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b,
                 timeout=600, interval=0.5, what="the batch to complete")
    elapsed = time.monotonic() - started
    done.set()
    sampler.join(5)
    assert final.request_counts is not None
    assert (final.request_counts.total, final.request_counts.completed) == (50_000, 50_000)
    assert final.output_file_id
    lines = client.files.content(final.output_file_id).text.splitlines()
    assert len(lines) == 50_000
    assert json.loads(lines[0])["custom_id"] == "req-0"
    assert json.loads(lines[-1])["custom_id"] == "req-49999"
    print(f"\n50,000-line batch: created in {created:.1f} s, complete in {elapsed:.1f} s "
          f"({50_000 / elapsed:,.0f} jobs/s); API RSS {base // 2**20} MB before, "
          f"{peak[0] // 2**20} MB at its peak")
    assert (peak[0] - base) // 2**20 < 150, "the API held the batch in memory"


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False

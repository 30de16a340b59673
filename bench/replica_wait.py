"""What waiting for a replica costs a batch's start, under Sentinel.

A primary, one replica and three sentinels from the embedded binary on loopback. A batch's
start (``start_run_replicated``: the START_RUN step, then ``WAIT 1`` on the same
connection in the same round trip) is timed ``--starts`` times with the wait and without
it, alternating in rounds so that both see the same machine. The failover figures (time
from the primary's SIGKILL to the first result on the new one, repeated provider calls,
the API's 503s) come from the failover test:
``.venv/bin/python -m pytest -m load tests/faults/test_failover.py -s``.

    .venv/bin/python bench/replica_wait.py [--starts 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table
from jobs.queue import RedisQueue, connect
from promptbatch.embedded import SentinelGroup

ROUNDS = 10


def _time_starts(queue: RedisQueue, n: int, replicas: int, tag: str) -> list[float]:
    took = []
    for i in range(n):
        started = time.perf_counter()
        _, held = queue.start_run_replicated(f"{tag}-{i}", "send", 0, 60, 2, time.time(),
                                             replicas=replicas, wait_ms=500)
        took.append(time.perf_counter() - started)
        assert held, "the replica did not acknowledge a start"
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SentinelGroup(Path(tmp)) as group:
        queue = RedisQueue(connect(group.url))
        per_round = max(1, args.starts // ROUNDS)
        waits: list[float] = []
        plain: list[float] = []
        for k in range(ROUNDS):
            plain += _time_starts(queue, per_round, 0, f"plain{k}")
            waits += _time_starts(queue, per_round, 1, f"wait{k}")
    rows = []
    for name, xs in (("no wait", plain), ("WAIT 1 replica", waits)):
        xs.sort()
        rows.append([name, f"{len(xs):,}", f"{statistics.mean(xs) * 1e6:,.0f}",
                     f"{xs[len(xs) // 2] * 1e6:,.0f}", f"{xs[int(len(xs) * 0.99)] * 1e6:,.0f}"])
    table("A batch's start, with and without waiting for a replica",
          ["start", "starts", "mean µs", "median µs", "p99 µs"], rows)
    extra = statistics.mean(waits) - statistics.mean(plain)
    print(f"\nwaiting for the replica adds {extra * 1e6:,.0f} µs to a batch's start "
          f"({statistics.mean(waits) / statistics.mean(plain):.2f}x); a batch of 32 jobs "
          f"pays it once")


if __name__ == "__main__":
    main()

"""Submit throughput of the HTTP API on loopback: single-job POSTs vs POSTs of 1,000 jobs.

    .venv/bin/python bench/api.py [--jobs 20000] [--single 2000]

The API runs as `promptbatch api` (uvicorn, one process) on an embedded Valkey server and
a SQLite file; the client uses one keep-alive connection. Target: at least 10,000 jobs/s
through batched POSTs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import Children, child_env, migrated, promptbatch_argv, table
from config.settings import Settings
from promptbatch.embedded import EmbeddedRedis, free_port

KEY = "bench-key"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--single", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pb-api-") as d, \
            EmbeddedRedis(Path(d) / "redis") as server:
        s = Settings(redis_url=server.url, database_url=f"sqlite:///{Path(d) / 'jobs.db'}",
                     _env_file=None)  # type: ignore[call-arg]
        migrated(s)
        port = free_port()
        kids = Children(Path(d))
        kids.start("api", promptbatch_argv("api", "--port", str(port)), child_env(
            s, PROMPTBATCH_API_KEYS=f'{{"{KEY}": "bench"}}',
            PROMPTBATCH_MAX_PENDING_PER_TENANT="10000000"))
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=120) as http:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if http.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("the API did not start")
                    time.sleep(0.1)
                t0 = time.perf_counter()
                for i in range(args.single):
                    http.post("/v1/jobs", json={"prompt": f"Summarise ticket {i}: the "
                                                "printer is jammed again"}).raise_for_status()
                single = time.perf_counter() - t0
                t0 = time.perf_counter()
                for start in range(0, args.jobs, 1000):
                    jobs = [{"prompt": f"Summarise ticket {i}: the printer is jammed again",
                             "priority": "bulk"} for i in range(start, start + 1000)]
                    http.post("/v1/jobs", json={"jobs": jobs}).raise_for_status()
                batched = time.perf_counter() - t0
        finally:
            kids.stop()
    r1, r2 = args.single / single, args.jobs / batched
    table("HTTP API submit throughput (uvicorn, 1 process, loopback, Redis + SQLite)",
          ["run", "jobs", "seconds", "jobs/s", "vs single POSTs"],
          [("single-job POSTs", args.single, single, r1, "1.00x"),
           ("POSTs of 1,000 jobs", args.jobs, batched, r2, f"{r2 / r1:.1f}x")])


if __name__ == "__main__":
    main()

"""A Redis that holds a week of results: nothing periodic or per request walks the keyspace.

With a million unrelated keys (named like Celery result metas, as a week of history
leaves them), the scheduler's overview, the semantic index's reload, a cache purge and
2,000 jobs run; the server's own command counters must show no SCAN or KEYS. (The time
against an empty server is measured by ``bench/keyspace.py``: 10,000,000 keys.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs import cache
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis
from tests.conftest import Procs
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

KEYS = 1_000_000
JOBS = 2_000


def test_a_million_keys_in_redis_are_never_scanned(tmp_path: Path, settings: Settings) -> None:
    server = EmbeddedRedis(tmp_path / "full", appendonly=False,
                           extra_args=["--enable-debug-command", "yes"]).start()
    r = redis.Redis.from_url(server.url, decode_responses=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    s = settings.model_copy(update={"redis_url": server.url})
    procs = Procs(s, logs)
    try:
        r.execute_command("DEBUG", "POPULATE", KEYS, "celery-task-meta-week", 120)
        assert r.dbsize() >= KEYS
        r.config_resetstat()
        semantic = {"PROMPTBATCH_CACHE_SEMANTIC_TENANTS": json.dumps(["acme"])}
        procs.scheduler(**semantic)  # becoming active reloads the semantic index
        procs.worker(2, **semantic)
        # A deployment cooling down: the overview lists it.
        r.set(keys.cooldown("openai|gpt-4o"), "1", ex=60)
        r.zadd(keys.COOLING, {"openai|gpt-4o": time.time() + 60})
        with Client(s) as client:
            started = time.monotonic()
            ids = client.submit_many({"prompt": f"ticket {i}: route it",
                                      "params": {"temperature": 0},
                                      "tenant": "acme" if i % 2 else "globex",
                                      "cache": "semantic" if i % 10 == 1 else "auto"}
                                     for i in range(JOBS))
            assert len(list(client.results(ids, timeout=120))) == JOBS
            elapsed = time.monotonic() - started
            # The overview is refreshed every second: wait for two more refreshes.
            first = poll(lambda: r.get(keys.OVERVIEW), timeout=10, what="an overview")
            poll(lambda: r.get(keys.OVERVIEW) != first, timeout=10, what="a refresh")
            overview = json.loads(r.get(keys.OVERVIEW) or "{}")
            assert overview["cooling"] == ["openai|gpt-4o"]
            purged = cache.purge(client.queue, tenant="acme")
            assert purged == JOBS // 2  # every acme answer was cached, and found
        stats = r.info("commandstats")
        assert "cmdstat_scan" not in stats, stats.get("cmdstat_scan")
        assert "cmdstat_keys" not in stats, stats.get("cmdstat_keys")
        print(f"\n{JOBS} jobs with {KEYS:,} other keys in Redis: {elapsed:.2f} s")
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        r.close()
        server.stop()

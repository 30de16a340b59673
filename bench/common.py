"""Helpers shared by the benchmarks: a local server and processes, tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from config import keys
from config.settings import Settings

console = Console(width=160)


def migrated(settings: Settings) -> Settings:
    """``settings``, its job store migrated (as `promptbatch migrate` does)."""
    from jobs.store import JobStore

    store = JobStore(settings.database_url)
    store.migrate()
    store.close()
    return settings


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment giving a child process the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update({"PROMPTBATCH_REDIS_URL": settings.redis_url,
                "PROMPTBATCH_DATABASE_URL": settings.database_url,
                "PROMPTBATCH_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Children:
    """Processes started by a benchmark, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(list(argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def wait_for_workers(url: str, slots: int, timeout: float = 60) -> None:
    """Wait until workers with ``slots`` pool processes report to ``pb:workers``."""
    r = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = sum(int(json.loads(v)["concurrency"]) for v in r.hgetall(keys.WORKERS).values())
        if have >= slots:
            return
        time.sleep(0.05)
    raise RuntimeError("workers did not start")


def promptbatch_argv(*args: str) -> list[str]:
    """argv running the promptbatch command with this interpreter."""
    return [sys.executable, "-m", "promptbatch", *args]


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a table."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for row in rows:
        t.add_row(*(f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row))
    console.print(t)

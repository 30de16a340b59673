"""A Batch API batch on a PostgreSQL database under a language's collation (the official
image's default is en_US.utf8): its jobs are still found and counted, and it completes."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from sqlalchemy import text

from config.settings import Settings
from jobs.store import JobStore
from producers.client import Client
from tests.integration.test_retention import _batch_of_three, _end

pytestmark = pytest.mark.integration


def _database_sorting_like_english(admin_url: str) -> str:
    """A new database whose strings sort as en-US does (ICU): ``;`` before ``:``."""
    name = f"pb_{uuid.uuid4().hex[:12]}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
                     "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def test_a_batch_completes_on_a_database_that_sorts_like_english(
        settings: Settings, pg_admin_url: str) -> None:
    url = _database_sorting_like_english(pg_admin_url)
    store = JobStore(url)
    store.migrate()
    with store.engine.connect() as conn:  # the collation the range would have met
        assert conn.execute(text("SELECT 'batch_x:a' < 'batch_x;'")).scalar_one() is False
    with Client(settings.model_copy(update={"database_url": url}), store=store) as client:
        service, record, _, jobs = _batch_of_three(client, "24h")
        assert service.get("acme", record["id"])["status"] == "in_progress"
        _end(client, jobs, at=time.time())
        final = service.get("acme", record["id"])
        assert final["status"] == "completed", final
        assert final["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        with store.engine.connect() as conn:  # counted through the byte-order index
            conn.execute(text("SET enable_seqscan = off"))
            plan = " ".join(str(r[0]) for r in conn.execute(text(
                "EXPLAIN SELECT state, count(*) FROM jobs WHERE tenant = 'acme' AND "
                "idempotency_key COLLATE \"C\" >= 'batch_x:' AND "
                "idempotency_key COLLATE \"C\" < 'batch_x;' GROUP BY state")))
        assert "ix_jobs_tenant_idem_c" in plan, plan

"""Retention that keeps what an open Batch API batch needs: a batch's input file as a
column (``input_file_id``, indexed: which open batches still use a file is one index
lookup), filled in from the batches' records; and the age indexes of batches and files
by (age, id), so retention's pages can go on after the rows they keep.

On PostgreSQL, an index of the jobs' ``(tenant, idempotency_key)`` in byte order
(``COLLATE "C"``): a batch's jobs are counted as the range of keys from ``{batch id}:``
to ``{batch id};``, which a database under a language's collation (en_US: ``;`` sorts
before ``:``) would find empty.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_BATCHES = sa.table("batches", sa.column("id"), sa.column("data"),
                    sa.column("input_file_id"))


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("input_file_id", sa.String(64), nullable=True))
    conn = op.get_bind()
    after = ""
    while True:  # the records written so far, a page at a time
        rows = conn.execute(sa.select(_BATCHES.c.id, _BATCHES.c.data)
                            .where(_BATCHES.c.id > after).order_by(_BATCHES.c.id)
                            .limit(500)).all()
        if not rows:
            break
        for batch_id, data in rows:
            try:
                source = json.loads(data).get("input_file_id")
            except (ValueError, AttributeError):
                source = None
            if isinstance(source, str):
                conn.execute(sa.update(_BATCHES).where(_BATCHES.c.id == batch_id)
                             .values(input_file_id=source))
        after = rows[-1][0]
    op.create_index("ix_batches_input_file", "batches", ["input_file_id"])
    op.drop_index("ix_batches_created", table_name="batches")
    op.create_index("ix_batches_created", "batches", ["created_at", "id"])
    op.drop_index("ix_files_created", table_name="files")
    op.create_index("ix_files_created", "files", ["created_at", "id"])
    if conn.dialect.name == "postgresql":
        op.create_index("ix_jobs_tenant_idem_c", "jobs",
                        ["tenant", sa.text('idempotency_key COLLATE "C"')])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_jobs_tenant_idem_c", table_name="jobs")
    op.drop_index("ix_files_created", table_name="files")
    op.create_index("ix_files_created", "files", ["created_at"])
    op.drop_index("ix_batches_created", table_name="batches")
    op.create_index("ix_batches_created", "batches", ["created_at"])
    op.drop_index("ix_batches_input_file", table_name="batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("input_file_id")

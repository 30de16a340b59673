"""Retention, the reconciler's grace and idempotency: when a job's row was written
(``stored_at``: a long submit writes its rows well after its jobs' ``created_at``), the
digest of the request an idempotency key was first used with (``request_hash``), and
indexes by age for the pages that delete Batch API records and files past
``retention_days``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stored_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(64), nullable=True))
    op.create_index("ix_batches_created", "batches", ["created_at"])
    op.create_index("ix_files_created", "files", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_files_created", table_name="files")
    op.drop_index("ix_batches_created", table_name="batches")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_hash")
        batch.drop_column("stored_at")

"""The half-price lane: the records of provider batches (a provider's own batch endpoint),
and the jobs waiting at a provider found by their batch's id (``ix_jobs_at_provider``: a
partial index of the rows in state ``AT_PROVIDER`` only, so the jobs of the fast path,
whose ``batch_id`` every result writes, never touch it).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("deployment", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("jobs", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("next_at", sa.Float, nullable=False),
        sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("provider_batch_id", sa.String(128), nullable=True),
        sa.Column("input_file_id", sa.String(128), nullable=True),
        sa.Column("attempt_token", sa.String(36), nullable=True),
        sa.Column("attempt_at", sa.Float, nullable=True),
        sa.Column("submitted_at", sa.Float, nullable=True),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("closed_at", sa.Float, nullable=True),
        sa.Column("cancel_at", sa.Float, nullable=True),
        sa.Column("provider_status", sa.String(32), nullable=True),
        sa.Column("counts", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_provider_batches_state", "provider_batches", ["state", "next_at"])
    op.create_index("ix_provider_batches_created", "provider_batches", ["created_at", "id"])
    waiting = sa.text("state = 'AT_PROVIDER'")
    op.create_index("ix_jobs_at_provider", "jobs", ["batch_id"], sqlite_where=waiting,
                    postgresql_where=waiting)


def downgrade() -> None:
    op.drop_index("ix_jobs_at_provider", table_name="jobs")
    op.drop_index("ix_provider_batches_created", table_name="provider_batches")
    op.drop_index("ix_provider_batches_state", table_name="provider_batches")
    op.drop_table("provider_batches")

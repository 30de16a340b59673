"""Indexes for the reconciler's bounded pages: unfinished jobs by (state, id), finished
jobs by (finished_at, id).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_state_id", "jobs", ["state", "id"])
    op.create_index("ix_jobs_finished", "jobs", ["finished_at", "id"])
    op.drop_index("ix_jobs_state", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.drop_index("ix_jobs_state_id", table_name="jobs")

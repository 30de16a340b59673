"""The store's identity: a random id every process of one deployment checks against the
one published in Redis, so that no component works with a different store unnoticed.
Also: admin API keys (they may act for any tenant), and the caller's own id of a job
(``client_id``: a JSONL line's ``id``), by which it can be found.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "store_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.bulk_insert(meta, [{"key": "store_id", "value": str(uuid.uuid4())}])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("admin", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("client_id", sa.String(255), nullable=True))
    op.create_index("ix_jobs_tenant_client", "jobs", ["tenant", "client_id"])
    op.create_index("ix_jobs_client", "jobs", ["client_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_client", table_name="jobs")
    op.drop_index("ix_jobs_tenant_client", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("client_id")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("admin")
    op.drop_table("store_meta")

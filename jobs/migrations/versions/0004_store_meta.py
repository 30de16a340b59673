"""The store's identity: a random id every process of one deployment checks against the
one published in Redis, so that no component works with a different store unnoticed.

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


def downgrade() -> None:
    op.drop_table("store_meta")

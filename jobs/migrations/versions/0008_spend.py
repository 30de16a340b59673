"""Money: what each job's tenant and key spent and saved per deployment and day, the
budgets of tenants and keys, and on each job the key that submitted it and what it
reserved against those budgets.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None



def _key() -> list[sa.Column[str]]:
    """The columns a row of spend or savings is summed by."""
    return [sa.Column("day", sa.String(10), primary_key=True),
            sa.Column("tenant", sa.String(64), primary_key=True),
            sa.Column("api_key", sa.String(16), primary_key=True),
            sa.Column("provider", sa.String(64), primary_key=True),
            sa.Column("model", sa.String(128), primary_key=True)]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("api_key", sa.String(16), nullable=True))
        batch.add_column(sa.Column("reserved_usd", sa.Float, nullable=True))
        batch.add_column(sa.Column("reserved_in", sa.String(4), nullable=True))
    op.create_table(
        "spend", *_key(),
        sa.Column("jobs", sa.Integer, nullable=False),
        sa.Column("unpriced", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_tokens", sa.BigInteger, nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False))
    op.create_index("ix_spend_tenant_day", "spend", ["tenant", "day"])
    op.create_table(
        "savings", *_key(),
        sa.Column("reason", sa.String(16), primary_key=True),
        sa.Column("jobs", sa.Integer, nullable=False),
        sa.Column("saved_usd", sa.Float, nullable=False))
    op.create_index("ix_savings_tenant_day", "savings", ["tenant", "day"])
    op.create_table(
        "budgets",
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("limit_usd", sa.Float, nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("period_key", sa.String(10), nullable=False),
        sa.Column("spent_usd", sa.Float, nullable=False),
        sa.Column("reserved_usd", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False))


def downgrade() -> None:
    op.drop_table("budgets")
    op.drop_index("ix_savings_tenant_day", table_name="savings")
    op.drop_table("savings")
    op.drop_index("ix_spend_tenant_day", table_name="spend")
    op.drop_table("spend")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reserved_in")
        batch.drop_column("reserved_usd")
        batch.drop_column("api_key")

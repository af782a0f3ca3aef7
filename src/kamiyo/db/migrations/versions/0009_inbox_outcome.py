"""the inbox's outcome: what applying an event did, as JSON (domain/outcomes.py)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 20:30:00.000000

Rows applied before it keep their one-line ``detail`` and no outcome. Adding a nullable column
without a default changes no row: it takes no time on a large inbox, on either database.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("outcome", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("outcome")

"""the inbox's type and object indexes leave out pending events (ingest throughput)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 09:55:00.000000

The inbox writer inserts every delivery while the endpoint waits; each row it also put in these
two indexes would cost two more random B-tree pages (models.py, NOT_PENDING), so they are
partial and the worker adds the row when it sets the outcome. On a large PostgreSQL inbox, creating the indexes locks
``webhook_events`` against writes while it runs: deliveries then wait or get 503, and Stripe
retries them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOT_PENDING = sa.text("status <> 'pending'")


def upgrade() -> None:
    for column in ("type", "object_id"):
        name = f"ix_webhook_events_{column}"
        op.drop_index(name, table_name="webhook_events")
        op.create_index(name, "webhook_events", [column], sqlite_where=_NOT_PENDING, postgresql_where=_NOT_PENDING)


def downgrade() -> None:
    for column in ("type", "object_id"):
        name = f"ix_webhook_events_{column}"
        op.drop_index(name, table_name="webhook_events")
        op.create_index(name, "webhook_events", [column])

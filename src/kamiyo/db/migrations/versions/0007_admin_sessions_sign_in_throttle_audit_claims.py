"""console sessions and sign-in throttling in the database; audit claims; no REPLACE of an audit entry

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 09:00:00.000000

- ``admin_sessions``: the console's sessions, so that every ``kamiyo serve`` replica knows them
  and signing out ends one on the server (only a hash of the cookie's id is stored).
- ``admin_sign_in_failures``: wrong admin tokens per client address, shared by the replicas.
- ``audit_log.claimed_by``: a name an operator gave without proving it, beside the proven actor.
  Added in place (ALTER TABLE ADD COLUMN, no batch copy), so 0005's triggers stay.
- On SQLite, ``INSERT OR REPLACE INTO audit_log`` with an existing id deletes that row without
  firing the DELETE trigger (SQLite fires none for REPLACE unless recursive triggers are on): a
  BEFORE INSERT trigger refuses any insert of an id that exists. On PostgreSQL the primary key
  refuses it, and ``ON CONFLICT DO UPDATE`` fires 0005's UPDATE trigger.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_NO_REPLACE = (
    "CREATE TRIGGER audit_log_no_replace BEFORE INSERT ON audit_log "
    "WHEN EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id) "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
)


def upgrade() -> None:
    op.create_table(
        "admin_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("operator", sa.String(length=64), nullable=False),
        sa.Column("claimed", sa.String(length=64), nullable=True),
        sa.Column("token_check", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_admin_sessions")),
    )
    op.create_index(op.f("ix_admin_sessions_expires_at"), "admin_sessions", ["expires_at"], unique=False)
    op.create_table(
        "admin_sign_in_failures",
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("client", name=op.f("pk_admin_sign_in_failures")),
    )
    op.create_index(
        op.f("ix_admin_sign_in_failures_window_start"), "admin_sign_in_failures", ["window_start"], unique=False
    )
    op.add_column("audit_log", sa.Column("claimed_by", sa.String(length=255), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        op.execute(_SQLITE_NO_REPLACE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_replace")
        # SQLite >= 3.35 drops a column in place; the table and its other triggers stay.
        op.execute("ALTER TABLE audit_log DROP COLUMN claimed_by")
    else:
        op.drop_column("audit_log", "claimed_by")
    op.drop_index(op.f("ix_admin_sign_in_failures_window_start"), table_name="admin_sign_in_failures")
    op.drop_table("admin_sign_in_failures")
    op.drop_index(op.f("ix_admin_sessions_expires_at"), table_name="admin_sessions")
    op.drop_table("admin_sessions")

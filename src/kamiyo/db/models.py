"""The tables. Stripe timestamps stay integers (Unix seconds), as Stripe sends them."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kamiyo.domain.outcomes import InboxStatus

# Stable constraint names, so migrations on SQLite and PostgreSQL name things the same way.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    """The runbook's ``users`` table: the tier and status the application reads."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    # Stored lower-cased by the application, so the unique constraint is case-insensitive.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), index=True)
    subscription_tier: Mapped[str] = mapped_column(String(32), default="free", server_default="free")
    subscription_status: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.current_timestamp())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.current_timestamp())


class Customer(Base):
    """A Stripe customer and the user it is linked to (None until an event names its email)."""

    __tablename__ = "stripe_customers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    email: Mapped[str | None] = mapped_column(String(320))
    # `created` of the event that last set the email: an older event never overwrites a newer one.
    email_seen_at: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    linked_by: Mapped[str | None] = mapped_column(String(32))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.current_timestamp())


class Subscription(Base):
    """The newest known snapshot of one Stripe subscription.

    ``version_*`` is the snapshot's order key, compared as a tuple inside the upsert itself:
    (terminal, event created, status rank, event type rank, event id). See domain/versions.py.
    """

    __tablename__ = "stripe_subscriptions"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    customer_id: Mapped[str] = mapped_column(ForeignKey("stripe_customers.id"), index=True)
    status: Mapped[str] = mapped_column(String(32))
    tier: Mapped[str] = mapped_column(String(32))
    price_ids: Mapped[str] = mapped_column(String(2048), default="", server_default="")
    livemode: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    stripe_created: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    current_period_end: Mapped[int | None] = mapped_column(BigInteger)
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    cancel_at: Mapped[int | None] = mapped_column(BigInteger)
    canceled_at: Mapped[int | None] = mapped_column(BigInteger)
    ended_at: Mapped[int | None] = mapped_column(BigInteger)
    trial_end: Mapped[int | None] = mapped_column(BigInteger)
    version_terminal: Mapped[int] = mapped_column(Integer)
    version_created: Mapped[int] = mapped_column(BigInteger)
    version_rank: Mapped[int] = mapped_column(Integer)
    version_event_id: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.current_timestamp())


# The lookup indexes of the inbox (by type, by object) hold the events the worker has taken up,
# not the pending ones. Every delivery inserts a row while the endpoint waits; a row in those two
# indexes would cost the inbox writer two more random B-tree pages per event, about as much as
# the rest of its work per event (docs/PERFORMANCE.md). The worker adds each row to them when
# it sets the row's outcome. A query of the pending events by type or object finds them through
# the claim index instead (``status = 'pending'``): the backlog, not the whole inbox.
# A literal, not a bound parameter, so that both SQLite and PostgreSQL can prove a query's
# condition implies the index's.
NOT_PENDING = text(f"status <> '{InboxStatus.PENDING.value}'")


class WebhookEvent(Base):
    """The inbox: every accepted event, stored before the endpoint answers."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_claim", "status", "available_at"),
        Index("ix_webhook_events_type", "type", sqlite_where=NOT_PENDING, postgresql_where=NOT_PENDING),
        Index("ix_webhook_events_object_id", "object_id", sqlite_where=NOT_PENDING, postgresql_where=NOT_PENDING),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    stripe_event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(255))
    api_version: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[int] = mapped_column(BigInteger)
    livemode: Mapped[bool] = mapped_column(Boolean)
    object_id: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16), default="webhook", server_default="webhook")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # pending → applied | ignored | failed (parked after the last attempt). Replay sets pending again.
    status: Mapped[str] = mapped_column(
        String(16), default=InboxStatus.PENDING.value, server_default=InboxStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Unix seconds (float) before which the worker leaves it alone: the retry backoff.
    available_at: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    # What applying it did: ``outcome`` as data (domain/outcomes.py, written by the apply engine),
    # ``detail`` the sentence made from it (rows from before the outcome column have only that).
    detail: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[dict[str, object] | None] = mapped_column(JSON)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When `kamiyo replay` last queued it again (for incident reports); None if never replayed.
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ReconcileRun(Base):
    """One run of ``kamiyo sync`` or ``kamiyo backfill``: progress, cursor for --resume, outcome."""

    __tablename__ = "reconcile_runs"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # sync | backfill
    status: Mapped[str] = mapped_column(String(16), default="running", server_default="running")
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    scope: Mapped[str | None] = mapped_column(String(400))  # e.g. customer=cus_... or email=...
    cursor: Mapped[str | None] = mapped_column(String(255))  # last object id fully processed
    seen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    changed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class DeliveryStat(Base):
    """Webhook deliveries counted per minute, outcome, reason and event type.

    Bounded in size whatever the traffic (one row per combination per minute), shared by every
    process that serves the endpoint, and kept for incident reports and health ratios.
    """

    __tablename__ = "webhook_delivery_stats"

    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # Unix seconds // 60 * 60
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)  # accepted|duplicate|rejected
    reason: Mapped[str] = mapped_column(String(32), primary_key=True, default="")  # rejection reason or ""
    event_type: Mapped[str] = mapped_column(String(255), primary_key=True, default="")  # "" when unknown
    count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class WorkerHeartbeat(Base):
    """One row per running worker, touched every few seconds: is anything applying events?"""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid:random
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)  # Unix seconds
    seen_at: Mapped[float] = mapped_column(Float, index=True)  # Unix seconds of the last beat


class UserOverride(Base):
    """An operator's manual tier for one user (``kamiyo users set-tier``).

    While active (``expires_at`` is None or in the future) it wins over every subscription, in
    ``domain.rules.recompute_user``; the worker deletes it once expired. Its history is in ``audit_log``.
    """

    __tablename__ = "user_overrides"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    tier: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    set_by: Mapped[str] = mapped_column(String(255))
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class AuditRecord(Base):
    """Append-only log of manual actions: who, when, why, and the state before and after.

    Triggers created by migration 0005 reject UPDATE and DELETE (and TRUNCATE on PostgreSQL), and
    on SQLite one from 0007 rejects an INSERT of an existing id (``INSERT OR REPLACE`` deletes the
    old row without firing the DELETE trigger), so ``info["append_only"]`` tells test helpers not
    to try to empty it.
    """

    __tablename__ = "audit_log"
    __table_args__ = ({"info": {"append_only": True}},)

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    action: Mapped[str] = mapped_column(String(64))  # override.set, override.clear, replay, sync, ...
    actor: Mapped[str] = mapped_column(String(255))  # --by, or the OS user
    reason: Mapped[str | None] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(String(400), index=True)  # an email, an event id, a scope
    before: Mapped[dict[str, object] | None] = mapped_column(JSON)
    after: Mapped[dict[str, object] | None] = mapped_column(JSON)
    # A name the actor gave without proving it (the console's name field, X-Kamiyo-Actor, --by):
    # kept beside the proven actor, never instead of it.
    claimed_by: Mapped[str | None] = mapped_column(String(255))


class AdminSession(Base):
    """A signed-in console session, shared by every ``kamiyo serve``; signing out deletes it.

    The cookie holds a random id; only its SHA-256 is stored, so a copy of this table opens
    nothing. ``token_check`` (an HMAC of that id keyed by the operator's token) ends the session
    when that token is rotated or removed. Times are Unix seconds.
    """

    __tablename__ = "admin_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator: Mapped[str] = mapped_column(String(64))  # the name of the token that signed in
    claimed: Mapped[str | None] = mapped_column(String(64))  # the name typed into the sign-in form
    token_check: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)


class AdminSignInFailure(Base):
    """Wrong admin tokens per client address in the current window (sign-in form and bearer alike),
    shared by every ``kamiyo serve``: past the limit the address is refused until the window ends."""

    __tablename__ = "admin_sign_in_failures"

    client: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, index=True)  # Unix seconds
    failures: Mapped[int] = mapped_column(Integer)


class MaintenanceTask(Base):
    """A housekeeping task the workers share (the inbox's retention): who runs it, and how it last went.

    One worker at a time holds it (``holder``, until ``lease_until``, renewed by each of its short
    transactions). The outcome columns are read by the health check and the metrics, so that every
    process reports the same, whichever worker ran the task.
    """

    __tablename__ = "maintenance_tasks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128))  # a worker id (telemetry/heartbeat.py)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # Unix seconds
    last_success_at: Mapped[float | None] = mapped_column(Float)
    last_failure_at: Mapped[float | None] = mapped_column(Float)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    last_pruned: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # rows, last run


# The Core tables, typed as such, for the hot paths that use SQL expressions directly.
users_table = cast(Table, User.__table__)
customers_table = cast(Table, Customer.__table__)
subscriptions_table = cast(Table, Subscription.__table__)
events_table = cast(Table, WebhookEvent.__table__)
reconcile_runs_table = cast(Table, ReconcileRun.__table__)
delivery_stats_table = cast(Table, DeliveryStat.__table__)
worker_heartbeats_table = cast(Table, WorkerHeartbeat.__table__)
user_overrides_table = cast(Table, UserOverride.__table__)
audit_log_table = cast(Table, AuditRecord.__table__)
admin_sessions_table = cast(Table, AdminSession.__table__)
admin_sign_in_failures_table = cast(Table, AdminSignInFailure.__table__)
maintenance_tasks_table = cast(Table, MaintenanceTask.__table__)

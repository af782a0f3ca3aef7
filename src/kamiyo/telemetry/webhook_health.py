"""Webhook health: one entry per check and an overall verdict.

Served at ``GET /api/v1/payments/webhook/health`` (200 healthy, 503 degraded) and read by
``kamiyo doctor``. A check is ``ok``, ``warn`` (worth knowing, not degraded), ``fail``
(degraded) or ``skipped`` (could not be run: no database, no API key). No secret material is
ever part of the output: a secret is described by its count, its shape and a short fingerprint
(the first 8 hex digits of a SHA-256 of it), enough to tell two secrets apart and nothing more.

Two views of one report: ``public_json`` for the unauthenticated endpoint (the verdict, each
check's name and state, the start time, the secrets' count and fingerprints: what the doctor
compares), and ``to_json`` with every detail, scrubbed, for the admin API and the doctor.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select, text

from kamiyo import __version__
from kamiyo.config import Settings
from kamiyo.db.models import events_table
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.processing.restarts import RestartRecord
from kamiyo.processing.retention import RetentionStatus, retention_status
from kamiyo.scrub import redact
from kamiyo.telemetry.delivery_stats import ServiceState, delivery_totals, read_state
from kamiyo.telemetry.inbox_modes import MODE_WINDOW, recent_modes
from kamiyo.webhooks.writer_health import WriterHealth

OK, WARN, FAIL, SKIPPED = "ok", "warn", "fail", "skipped"
PRUNE_FAILURES_WARN = 3  # failed prune runs in a row (one every 5 minutes) before the check warns
_events = events_table
RESTART_WARN_SECONDS = 3600.0  # the worker check warns this long after the in-process worker died


@dataclass(frozen=True)
class Thresholds:
    """When a check turns from ok to fail."""

    silence_seconds: float = 1800.0  # the runbook's "no webhooks received in 30 minutes"
    ratio_window_seconds: float = 3600.0
    min_success_ratio: float = 0.95  # the runbook's "alert if < 95%"
    min_attempts_for_ratio: int = 5  # fewer deliveries than this say nothing about a ratio
    backlog_max_age_seconds: float = 600.0  # longer than the whole default retry schedule

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        """HEALTH_SILENCE_SECONDS, HEALTH_MIN_SUCCESS_RATIO, HEALTH_BACKLOG_MAX_AGE_SECONDS."""
        return cls(
            silence_seconds=settings.health_silence_seconds,
            min_success_ratio=settings.health_min_success_ratio,
            backlog_max_age_seconds=settings.health_backlog_max_age_seconds,
        )


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = redact({"name": self.name, "status": self.status, "detail": self.detail, **self.data})
        return entry

    def public_json(self) -> dict[str, Any]:
        """Name and state only; the secret check adds its count and fingerprints."""
        entry: dict[str, Any] = {"name": self.name, "status": self.status}
        if self.name == "secret":
            entry.update(configured=self.data.get("configured", 0), fingerprints=self.data.get("fingerprints", []))
        return entry


@dataclass(frozen=True)
class HealthReport:
    checks: list[Check]
    service: dict[str, Any]

    @property
    def healthy(self) -> bool:
        return not any(check.status == FAIL for check in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> dict[str, Any]:
        """Every check with its detail and data, and the service's facts: for the token holder."""
        return {
            "status": "healthy" if self.healthy else "degraded",
            "checks": [check.to_json() for check in self.checks],
            "service": self.service,
        }

    def public_json(self) -> dict[str, Any]:
        """What anybody may see: no error text, no id from a payload, no process id."""
        return {
            "status": "healthy" if self.healthy else "degraded",
            "checks": [check.public_json() for check in self.checks],
            "service": {"started_at": self.service.get("started_at")},
        }


# -- the secret -----------------------------------------------------------------------------


def fingerprint(secret: str) -> str:
    """A short, one-way fingerprint: tells whether two processes hold the same secret."""
    return hashlib.sha256(b"kamiyo-secret-fingerprint:" + secret.encode()).hexdigest()[:8]


def secret_problems(secret: str) -> list[str]:
    """What is wrong with the shape of one secret (the classic paste errors), if anything."""
    problems = []
    if secret != secret.strip():
        problems.append("surrounding whitespace or newline")
    if any(q in secret for q in "\"'"):
        problems.append("quotes")
    if not secret.strip().strip("\"'").startswith("whsec_"):
        problems.append("no whsec_ prefix")
    elif any(c.isspace() for c in secret.strip()):
        problems.append("whitespace inside")
    return problems


def check_secret(secrets: Sequence[str]) -> Check:
    """Step 2 of the runbook: configured and well-formed."""
    if not secrets:
        return Check(
            "secret",
            FAIL,
            "STRIPE_WEBHOOK_SECRET is not set: every delivery is answered 503",
            {"configured": 0, "fingerprints": []},
        )
    problems = {f"secret #{i}": p for i, s in enumerate(secrets, start=1) if (p := secret_problems(s))}
    data = {"configured": len(secrets), "fingerprints": [fingerprint(s) for s in secrets]}
    if problems:
        found = "; ".join(f"{name}: {', '.join(p)}" for name, p in problems.items())
        return Check("secret", FAIL, f"STRIPE_WEBHOOK_SECRET is malformed ({found})", data)
    return Check("secret", OK, f"{len(secrets)} secret(s) configured, well-formed (whsec_...)", data)


# -- the database-backed checks -------------------------------------------------------------


@dataclass(frozen=True)
class ParkedReason:
    reason: str
    count: int
    example: str


def parked_reasons(engine: Engine, *, limit: int = 10) -> list[ParkedReason]:
    """Parked failures grouped by the error class of their last error, most frequent first."""
    with engine.connect().execution_options(readonly=True) as connection:
        rows = connection.execute(
            select(_events.c.last_error, func.count())
            .where(_events.c.status == InboxStatus.FAILED)
            .group_by(_events.c.last_error)
            .order_by(func.count().desc())
            .limit(500)
        ).all()
    grouped: dict[str, ParkedReason] = {}
    for error, count in rows:
        message = error or "unknown error"
        reason = message.split(":", 1)[0] if ":" in message else message[:60]
        current = grouped.get(reason)
        grouped[reason] = ParkedReason(reason, (current.count if current else 0) + int(count), message[:300])
    return sorted(grouped.values(), key=lambda r: -r.count)[:limit]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _check_last_accepted(state: ServiceState, limits: Thresholds) -> Check:
    age = state.last_accepted_age
    if age is None:
        return Check("last_accepted", WARN, "no webhook accepted yet", {"age_seconds": None})
    data = {"age_seconds": round(age, 1)}
    if limits.silence_seconds and age > limits.silence_seconds:
        return Check(
            "last_accepted", FAIL, f"no webhook accepted for {_age(age)} (limit {_age(limits.silence_seconds)})", data
        )
    return Check("last_accepted", OK, f"last webhook accepted {_age(age)} ago", data)


def _check_success_ratio(engine: Engine, now: float, limits: Thresholds) -> Check:
    totals = delivery_totals(engine, now - limits.ratio_window_seconds, now + 60)
    ratio = totals.success_ratio
    window = _age(limits.ratio_window_seconds)
    data = {
        "window_seconds": limits.ratio_window_seconds,
        "attempts": totals.attempts,
        "failures": totals.rejected,
        "ratio": None if ratio is None else round(ratio, 4),
        "failures_by_reason": totals.by_reason,
    }
    if ratio is None:
        return Check("success_ratio", OK, f"no deliveries in the last {window}", data)
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(totals.by_reason.items(), key=lambda kv: -kv[1]))
    summary = f"{ratio:.1%} of {totals.attempts} deliveries succeeded in the last {window}"
    if reasons:
        summary += f" (failures: {reasons})"
    if ratio < limits.min_success_ratio and totals.attempts >= limits.min_attempts_for_ratio:
        return Check("success_ratio", FAIL, f"{summary}; below {limits.min_success_ratio:.0%}", data)
    return Check("success_ratio", WARN if totals.rejected else OK, summary, data)


def _check_backlog(state: ServiceState, limits: Thresholds) -> Check:
    data = {"pending": state.backlog, "oldest_pending_age_seconds": round(state.oldest_pending_age, 1)}
    if state.backlog == 0:
        return Check("backlog", OK, "no event waiting to be applied", data)
    summary = f"{state.backlog} event(s) pending, oldest {_age(state.oldest_pending_age)}"
    if state.oldest_pending_age > limits.backlog_max_age_seconds:
        return Check("backlog", FAIL, f"{summary}: stuck (limit {_age(limits.backlog_max_age_seconds)})", data)
    return Check("backlog", OK, summary, data)


def _check_parked(engine: Engine, state: ServiceState) -> Check:
    if state.parked == 0:
        return Check("parked", OK, "no parked failures", {"parked": 0, "reasons": []})
    reasons = parked_reasons(engine)
    data = {
        "parked": state.parked,
        "reasons": [{"reason": r.reason, "count": r.count, "example": r.example} for r in reasons],
    }
    listed = ", ".join(f"{r.reason} ×{r.count}" for r in reasons)
    return Check("parked", FAIL, f"{state.parked} event(s) parked as failed ({listed})", data)


def _check_worker(
    state: ServiceState, in_process: bool | None, restarts: RestartRecord | None = None, *, now: float
) -> Check:
    """Some worker alive; and ``kamiyo serve``'s own (``in_process``: None when it runs none) not
    dead, nor died within ``RESTART_WARN_SECONDS`` (it is restarted: worth knowing, not failing)."""
    data: dict[str, Any] = {"workers_alive": state.workers_alive}
    died = ""
    recent = False
    if in_process is not None:
        data["in_process_worker"] = in_process
        count, last = restarts.snapshot() if restarts is not None else (0, None)
        data["in_process_worker_restarts"] = count
        if last is not None:
            data["in_process_worker_last_error"] = last.error
            data["in_process_worker_last_died_at"] = round(last.died_at, 3)
            ago = _age(max(0.0, now - last.died_at))
            died = f"worker thread died {count} time(s); last error {last.error}, {ago} ago"
            recent = now - last.died_at < RESTART_WARN_SECONDS
    if in_process is False:
        detail = "the in-process worker is not running"
        detail += f" ({died}; it is being restarted)" if died else ""
        return Check("worker", FAIL, f"{detail}: events are stored but not applied by this service", data)
    if state.workers_alive:
        alive = f"{state.workers_alive} worker(s) alive"
        if died:
            detail = f"{alive}; the in-process {died}, and it was restarted"
            return Check("worker", WARN if recent else OK, detail, data)
        return Check("worker", OK, alive, data)
    return Check(
        "worker",
        FAIL,
        "no worker alive: events are stored but not applied "
        "(run `kamiyo serve` with WORKER_IN_PROCESS=true, or `kamiyo worker`)",
        data,
    )


# -- Stripe's mode and the inbox's retention: worth knowing, never degraded on their own -----------


def check_stripe_mode(mode: str | None, modes: frozenset[str]) -> Check:
    """Which mode the service takes; a warning when it takes both and both arrive."""
    data: dict[str, Any] = {"mode": mode, "recent_modes": sorted(modes)}
    if mode is not None:
        return Check("stripe_mode", OK, f"takes {mode}-mode events only (the other mode's are stored as ignored)", data)
    if len(modes) > 1:
        return Check(
            "stripe_mode",
            WARN,
            f"the newest {MODE_WINDOW} events mix live-mode and test-mode ones, and with neither STRIPE_MODE "
            "nor STRIPE_SECRET_KEY both are applied: set STRIPE_MODE=live (or test)",
            data,
        )
    seen = f"; the newest events are {next(iter(modes))}-mode" if modes else ""
    return Check("stripe_mode", OK, f"takes both modes (no STRIPE_MODE, no STRIPE_SECRET_KEY){seen}", data)


def check_retention(status: RetentionStatus | None, retention_days: int, now: float) -> Check:
    """How the inbox's retention last went (the workers prune every hour)."""
    if status is None:
        return Check("retention", OK, "no prune has run yet", {"retention_days": retention_days})
    data: dict[str, Any] = {
        "retention_days": retention_days,
        "last_success_at": status.last_success_at,
        "consecutive_failures": status.consecutive_failures,
        "last_pruned": status.last_pruned,
    }
    if status.consecutive_failures >= PRUNE_FAILURES_WARN:
        return Check(
            "retention",
            WARN,
            f"pruning the inbox failed {status.consecutive_failures} times in a row: {status.last_error}",
            data,
        )
    if status.last_success_at is None:
        return Check("retention", OK, "no prune has finished yet", data)
    age = max(0.0, now - status.last_success_at)
    return Check(
        "retention",
        OK,
        f"last prune {_age(age)} ago: {status.last_pruned} event(s) older than {retention_days} days",
        data,
    )


def check_writer(writer: WriterHealth) -> Check:
    """Can the serving process store a delivery now? Its inbox writer's state (``writer_health``)."""
    return Check("writer", OK if writer.ok else FAIL, writer.detail, {"state": writer.state})


StripeProbe = Callable[[], str]


def cached_probe(probe: StripeProbe, *, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic) -> StripeProbe:
    """``probe`` called at most once per ``ttl`` seconds; its answer (or its error) is reused meanwhile.

    A health endpoint polled every few seconds must not turn into a stream of API requests.
    """
    last: dict[str, Any] = {}
    lock = threading.Lock()

    def cached() -> str:
        with lock:
            if not last or clock() - last["at"] > ttl:
                try:
                    last.update(at=clock(), answer=probe(), error=None)
                except Exception as exc:  # noqa: BLE001 - reported by the check, and cached like an answer
                    last.update(at=clock(), answer=None, error=exc)
            if last["error"] is not None:
                raise last["error"]
            return str(last["answer"])

    return cached


def run_checks(
    engine: Engine,
    settings: Settings,
    *,
    now: float | None = None,
    limits: Thresholds | None = None,
    in_process_worker: bool | None = None,
    worker_restarts: RestartRecord | None = None,
    stripe_probe: StripeProbe | None = None,
    started_at: float | None = None,
    writer: WriterHealth | None = None,
) -> HealthReport:
    """Every check, in the order an operator reads them. Blocking (database, maybe Stripe).
    ``writer``: the serving process's inbox writer (no ``writer`` check without it)."""
    now = time.time() if now is None else now
    limits = limits or Thresholds.from_settings(settings)
    checks = [check_secret(settings.webhook_secrets)]
    if writer is not None:
        checks.append(check_writer(writer))
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            connection.execute(text("SELECT 1"))
        state = read_state(engine, now=now)
    except Exception as exc:  # noqa: BLE001 - any failure means the database is not usable
        checks.append(Check("database", FAIL, f"database unreachable: {exc.__class__.__name__}"))
        for name in ("last_accepted", "success_ratio", "backlog", "parked", "worker", "stripe_mode", "retention"):
            checks.append(Check(name, SKIPPED, "needs the database"))
    else:
        checks.append(Check("database", OK, f"{engine.dialect.name} reachable"))
        checks.append(_check_last_accepted(state, limits))
        checks.append(_check_success_ratio(engine, now, limits))
        checks.append(_check_backlog(state, limits))
        checks.append(_check_parked(engine, state))
        checks.append(_check_worker(state, in_process_worker, worker_restarts, now=now))
        checks.extend(_housekeeping(engine, settings, now))
    if stripe_probe is None:
        checks.append(Check("stripe_api", SKIPPED, "no Stripe API key configured"))
    else:
        try:
            checks.append(Check("stripe_api", OK, stripe_probe()))
        except Exception as exc:  # noqa: BLE001 - unreachable, refused or rate limited: all degrade
            checks.append(Check("stripe_api", FAIL, f"Stripe API unreachable: {exc.__class__.__name__}: {exc}"[:300]))
    service = {
        "version": __version__,
        "pid": os.getpid(),
        "started_at": started_at,
        "metrics_enabled": settings.metrics_enabled,
    }
    return HealthReport(checks, service)


def _housekeeping(engine: Engine, settings: Settings, now: float) -> list[Check]:
    try:
        modes = recent_modes(engine) if settings.stripe_mode is None else frozenset()
        status = retention_status(engine, now=now)
    except Exception as exc:  # noqa: BLE001 - the database answered a moment ago: report, do not fail
        return [Check(name, SKIPPED, f"not read: {exc.__class__.__name__}") for name in ("stripe_mode", "retention")]
    return [check_stripe_mode(settings.stripe_mode, modes), check_retention(status, settings.inbox_retention_days, now)]

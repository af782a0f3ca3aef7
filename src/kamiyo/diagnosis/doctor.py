"""``kamiyo doctor``: the runbook's Diagnosis Steps, run by the service on itself.

Each step gathers facts (the live endpoint, its health and metrics, the database, Stripe's API
when a key is configured) and a plain function turns them into a ``Finding``: what was found,
what to do, and the runbook's recovery option when one applies. The verdict is the most basic
failing finding (a service that does not answer outranks a wrong secret, which outranks a
stuck worker), so the on-call engineer reads one line to know which option to take.

The end-to-end probe posts a signed ``customer.subscription.created`` for a customer id of its
own (``cus_kamiyo_probe_...``) that no event has ever named: applying it touches no user,
and every row it made (event, subscription, customer) is deleted afterwards.
"""

from __future__ import annotations

import secrets
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, delete, func, select, text

from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import WRITE_WAIT_OPTION
from kamiyo.db.errors import FULL, LOCKED, describe, fault_kind, is_database_fault
from kamiyo.db.models import customers_table, events_table, subscriptions_table
from kamiyo.diagnosis.stripe_view import RUNBOOK_EVENTS, StripeWebhookView
from kamiyo.domain.modes import LIVE
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.operations.users import DriftView, unexplained_drift
from kamiyo.processing.retention import retention_status
from kamiyo.scrub import clean
from kamiyo.telemetry.delivery_stats import (
    DeliveryRow,
    ServiceState,
    delivery_rows,
    read_state,
)
from kamiyo.telemetry.inbox_modes import recent_modes
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX
from kamiyo.telemetry.webhook_health import (
    Check,
    ParkedReason,
    check_retention,
    check_secret,
    check_stripe_mode,
    fingerprint,
    parked_reasons,
)
from kamiyo.webhooks import writer_health
from kamiyo.webhooks.inbox import write_probe
from kamiyo.webhooks.signature import PROBE_HEADER, probe_header, signature_header

WEBHOOK_PATH = "/api/v1/payments/webhook"
USER_AGENT = "kamiyo-doctor/1"  # names the requests in access logs; proves nothing (see _ping)
OPTIONS = {
    1: "Option 1: Restart Service",
    2: "Option 2: Update Webhook Secret",
    3: "Option 3: Test with Stripe CLI",
    4: "Option 4: Recreate Webhook in Stripe",
    5: "Option 5: Manual Subscription Sync",
}
OK, WARN, FAIL, SKIPPED = "ok", "warn", "fail", "skipped"
WINDOW_SECONDS = 3600.0
# A reason must make up this share of the last hour's deliveries (and at least SPIKE_MIN of
# them) to be called a spike: a scanner's odd bad request is not a secret mismatch.
SPIKE_SHARE = 0.05
SPIKE_MIN = 3
DEPLOY_WINDOW_SECONDS = 1800.0
BACKLOG_STUCK_SECONDS = 600.0
PROBE_WRITE_WAIT = 2.0  # doctor's own write waits this long for the database's write lock

# The order in which causes explain an outage: the first failing one is the verdict.
_PRIORITY = {
    "config_invalid": 5,
    "service_down": 10,
    "writer_dead": 12,
    "writer_stalled": 12,
    "database_down": 15,
    "database_locked": 16,
    "database_full": 16,
    "secret_missing": 20,
    "secret_mismatch": 30,
    "endpoint_missing": 40,
    "endpoint_disabled": 40,
    "endpoint_events": 45,
    "worker_down": 50,
    "backlog_stuck": 55,
    "clock_skew": 60,
    "parked": 70,
    "probe_failed": 80,
    "drift": 90,
}
DRIFT_NAMED = 3  # users a drift finding names; `kamiyo users drift` lists them all


@dataclass(frozen=True)
class Finding:
    step: str
    status: str
    found: str
    todo: str = ""
    option: int | None = None
    cause: str | None = None  # a stable code for a failing finding (see _PRIORITY)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["option_title"] = OPTIONS.get(self.option) if self.option else None
        return data


@dataclass
class Diagnosis:
    url: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not any(f.status == FAIL for f in self.findings)

    @property
    def verdict(self) -> Finding | None:
        failing = [f for f in self.findings if f.status == FAIL]
        return min(failing, key=lambda f: _PRIORITY.get(f.cause or "", 100)) if failing else None

    def to_json(self) -> dict[str, Any]:
        verdict = self.verdict
        return {
            "url": self.url,
            "healthy": self.healthy,
            "verdict": verdict.to_json() if verdict else None,
            "findings": [f.to_json() for f in self.findings],
        }

    def to_text(self) -> str:
        lines = [f"kamiyo doctor: {self.url}", ""]
        for finding in self.findings:
            mark = {OK: "ok  ", WARN: "warn", FAIL: "FAIL", SKIPPED: "skip"}[finding.status]
            lines.append(f"[{mark}] {finding.step}: {finding.found}")
            if finding.todo:
                lines.append(f"       do: {finding.todo}")
        lines.append("")
        verdict = self.verdict
        if verdict is None:
            lines.append(
                "Verdict: healthy. The endpoint answers, verifies, stores and applies; no recovery option needed."
            )
        else:
            title = OPTIONS[verdict.option] if verdict.option else "No runbook option covers this"
            lines.append(f"Verdict: {title}. {verdict.found}")
            if verdict.todo:
                lines.append(f"         {verdict.todo}")
        return "\n".join(lines)


# -- pure rules: facts in, findings out -------------------------------------------------------


def diagnose_port(host: str, port: int, listening: bool, error: str = "") -> Finding:
    """Step 5: is anything listening where the endpoint should be?"""
    if listening:
        return Finding("Step 5: port", OK, f"{host}:{port} is listening")
    return Finding(
        "Step 5: port",
        FAIL,
        f"nothing listens on {host}:{port} ({error or 'connection refused'}): the service is down",
        "restart the service and check its log for the reason it stopped",
        option=1,
        cause="service_down",
    )


def diagnose_ping(status: int | None, body: Mapping[str, Any] | None, error: str = "") -> Finding:
    """Step 3: an unsigned ping must get 400 "missing signature" (the runbook's curl)."""
    step = "Step 3: endpoint"
    if status is None:
        return Finding(
            step,
            FAIL,
            f"the endpoint did not answer ({error})",
            "restart the service",
            option=1,
            cause="service_down",
        )
    reason = (body or {}).get("reason")
    if status == 400 and reason == "missing_signature":
        return Finding(step, OK, 'unsigned ping answered 400 "missing signature"')
    if status == 503 and reason == "not_configured":
        return Finding(
            step,
            FAIL,
            "the endpoint answers 503: STRIPE_WEBHOOK_SECRET is not set in the running service",
            "set STRIPE_WEBHOOK_SECRET (whsec_... from the Stripe Dashboard) and restart",
            option=2,
            cause="secret_missing",
        )
    return Finding(
        step,
        FAIL,
        f"unsigned ping answered {status} (expected 400 missing signature): service issue",
        "restart the service; if it persists, check what answers on this URL (proxy, another app)",
        option=1,
        cause="service_down",
    )


def _first_minute(rows: list[DeliveryRow], reason: str) -> int | None:
    minutes = [r.minute for r in rows if r.outcome == "rejected" and r.reason == reason]
    return min(minutes) if minutes else None


def diagnose_failures(
    rows: list[DeliveryRow] | None,
    metrics_by_reason: Mapping[str, float] | None,
    *,
    started_at: float | None,
) -> list[Finding]:
    """Step 1: recent validation failures, grouped by reason, and what a spike of each means."""
    step = "Step 1: validation failures"
    if rows is None and metrics_by_reason is None:
        return [Finding(step, SKIPPED, "neither the database nor /metrics could be read")]
    since_start = ""
    if metrics_by_reason:
        listed = ", ".join(f"{k} {int(v)}" for k, v in sorted(metrics_by_reason.items()) if v)
        since_start = f" (since the service started: {listed or 'none'})"
    if rows is None:
        return [Finding(step, WARN, f"delivery stats unavailable (database unreachable){since_start}")]

    by_reason: dict[str, int] = {}
    attempts = 0
    for row in rows:
        attempts += row.count
        if row.outcome == "rejected":
            by_reason[row.reason] = by_reason.get(row.reason, 0) + row.count
    if not by_reason:
        return [Finding(step, OK, f"no failed delivery in the last hour ({attempts} delivered){since_start}")]

    def spike(reason: str) -> bool:
        n = by_reason.get(reason, 0)
        return n >= SPIKE_MIN and n / max(attempts, 1) >= SPIKE_SHARE

    listed = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))
    summary = f"{sum(by_reason.values())} of {attempts} deliveries failed in the last hour ({listed}){since_start}"
    findings: list[Finding] = []
    if spike("invalid_signature"):
        after_deploy = ""
        first = _first_minute(rows, "invalid_signature")
        if (
            started_at is not None
            and first is not None
            and started_at - 60 <= first <= started_at + DEPLOY_WINDOW_SECONDS
        ):
            started = time.strftime("%H:%M:%S", time.localtime(started_at))
            after_deploy = f"; they began right after the service started at {started} (a deploy)"
        findings.append(
            Finding(
                step,
                FAIL,
                f"secret mismatch: {by_reason['invalid_signature']} deliveries with a signature no configured "
                f"secret matches{after_deploy}. {summary}",
                "copy the endpoint's signing secret from the Stripe Dashboard into STRIPE_WEBHOOK_SECRET and restart",
                option=2,
                cause="secret_mismatch",
            )
        )
    if spike("timestamp"):
        findings.append(
            Finding(
                step,
                FAIL,
                f"clock skew: {by_reason['timestamp']} deliveries were signed correctly but their timestamp is "
                f"outside the tolerance. {summary}",
                "synchronise this server's clock (NTP/chrony; `timedatectl`), then verify with "
                "`kamiyo trigger payment_intent.succeeded` (Option 3)",
                option=None,
                cause="clock_skew",
            )
        )
    if by_reason.get("not_configured"):
        findings.append(
            Finding(
                step,
                FAIL,
                f"{by_reason['not_configured']} deliveries answered 503: no webhook secret configured. {summary}",
                "set STRIPE_WEBHOOK_SECRET and restart",
                option=2,
                cause="secret_missing",
            )
        )
    if not findings:
        hints = []
        if by_reason.get("internal"):
            hints.append("internal: events could not be stored (database) and Stripe will retry them")
        if by_reason.get("malformed") or by_reason.get("payload") or by_reason.get("missing_signature"):
            hints.append(
                "malformed/payload/missing_signature: something other than Stripe posts here, or a proxy rewrites"
            )
        findings.append(Finding(step, WARN, summary, "; ".join(hints)))
    return findings


def diagnose_secret(local: tuple[str, ...], service_secret: Mapping[str, Any] | None) -> Finding:
    """Step 2: a secret present and well-formed, in the running service's environment too."""
    step = "Step 2: webhook secret"
    local_check = check_secret(local)
    if service_secret is not None:
        configured = int(service_secret.get("configured") or 0)
        if configured == 0:
            return Finding(
                step,
                FAIL,
                "the running service has no STRIPE_WEBHOOK_SECRET: every delivery gets 503",
                "set STRIPE_WEBHOOK_SECRET=whsec_... (Stripe Dashboard > Webhooks > Reveal) and restart",
                option=2,
                cause="secret_missing",
            )
        if service_secret.get("status") == FAIL:
            return Finding(
                step,
                FAIL,
                f"the running service's {service_secret.get('detail')}",
                "paste the secret again without quotes or spaces and restart",
                option=2,
                cause="secret_mismatch",
            )
        running = set(service_secret.get("fingerprints") or [])
        if local and not running & {fingerprint(s) for s in local}:
            return Finding(
                step,
                FAIL,
                "the running service holds a different secret than this environment (.env changed without a restart?)",
                "restart the service so it reads the current STRIPE_WEBHOOK_SECRET (Option 2's last step)",
                option=2,
                cause="secret_mismatch",
            )
        same = " (the same as this environment's)" if local else ""
        return Finding(step, OK, f"the running service has {configured} well-formed secret(s){same}")
    if local_check.status == FAIL:
        return Finding(step, FAIL, local_check.detail, "set STRIPE_WEBHOOK_SECRET", option=2, cause="secret_missing")
    return Finding(step, WARN, f"{local_check.detail} here; the running service could not be asked")


def diagnose_writer(service_writer: str | None, local_write: str | None) -> Finding:
    """Can the service store a delivery? ``service_writer``: the state the running service gives
    its inbox writer (``/health``'s ``writer``; None when it could not be asked).
    ``local_write``: how doctor's own write to the database went: None (it committed), a fault
    kind of ``kamiyo.db.errors``, or ``"skipped"`` (no database to write to)."""
    step = "Storing deliveries"
    if service_writer == writer_health.DEAD:
        return Finding(
            step,
            FAIL,
            "writer dead: the service's inbox writer process is not running; deliveries get 503 (Stripe retries)",
            "the service starts a new one within seconds; if this persists, look for `inbox writer process` in "
            "its log and restart the service",
            option=1,
            cause="writer_dead",
        )
    if service_writer == writer_health.STALLED:
        return Finding(
            step,
            FAIL,
            "writer stalled: the service's inbox writer process does not answer (stopped or hung); deliveries "
            "get 503 (Stripe retries)",
            "if it was stopped (a debugger, `kill -STOP`), resume it: `pkill -CONT -f kamiyo.webhooks.inbox_process`; "
            "otherwise restart the service",
            option=1,
            cause="writer_stalled",
        )
    if service_writer == writer_health.LOCKED_STATE or local_write == LOCKED:
        return Finding(
            step,
            FAIL,
            "database locked: another process holds the database's write lock; deliveries get 503 (Stripe retries)",
            "find what holds it and end it: an open `sqlite3` session inside a transaction (BEGIN without COMMIT), a "
            "long-running `kamiyo` command (`fuser -v data/kamiyo.db`); on PostgreSQL, pg_locks and "
            "pg_stat_activity. Deliveries are stored again as soon as it is released",
            cause="database_locked",
        )
    if service_writer == writer_health.FULL_STATE or local_write == FULL:
        return Finding(
            step,
            FAIL,
            "database full: the disk (or a size limit) refuses another page; deliveries get 503 (Stripe retries)",
            "free space where the database lives (`df -h data/`; old logs, a forgotten backup), then check with "
            "`kamiyo doctor` again: deliveries are stored as soon as it has room",
            cause="database_full",
        )
    if service_writer == writer_health.FAILING or (local_write is not None and local_write != "skipped"):
        return Finding(
            step,
            FAIL,
            "the database refuses writes; deliveries get 503 (Stripe retries)",
            "check the database server and its log (read-only? out of connections?), then restart the service",
            option=1,
            cause="database_down",
        )
    if service_writer is None:
        if local_write is None:
            return Finding(step, WARN, "the database takes writes; the service's writer could not be asked")
        return Finding(step, SKIPPED, "neither the service nor the database could be asked")
    return Finding(step, OK, "the service's inbox writer stores deliveries; the database takes writes")


def diagnose_processing(
    state: ServiceState | None, parked: list[ParkedReason], unlinked: int, *, db_error: str = ""
) -> list[Finding]:
    """Parked failures and their reasons, a stuck backlog, a worker that is not running."""
    step = "Processing"
    if state is None:
        return [
            Finding(
                step,
                FAIL,
                f"database unreachable ({db_error})",
                "check DATABASE_URL and the database server, then restart the service",
                option=1,
                cause="database_down",
            )
        ]
    findings: list[Finding] = []
    if state.workers_alive == 0:
        waiting = f"; {state.backlog} event(s) waiting" if state.backlog else ""
        findings.append(
            Finding(
                step,
                FAIL,
                f"worker not running: no worker has reported in the last 30 s{waiting}",
                "restart the service (it applies events unless WORKER_IN_PROCESS=false), or start `kamiyo worker`",
                option=1,
                cause="worker_down",
            )
        )
    if state.backlog and state.oldest_pending_age > BACKLOG_STUCK_SECONDS:
        findings.append(
            Finding(
                step,
                FAIL,
                f"stuck backlog: {state.backlog} event(s) pending, "
                f"the oldest for {state.oldest_pending_age / 60:.0f} min",
                "look for `worker batch failed` in the log; restart the service",
                option=1,
                cause="backlog_stuck",
            )
        )
    if state.parked:
        listed = "; ".join(f"{r.reason} ×{r.count} (e.g. {r.example})" for r in parked)
        unmapped = any(r.reason == "UnmappedPrice" for r in parked)
        todo = (
            "add the price to STRIPE_PRICE_TIERS (or set metadata.tier on the price in Stripe), restart, "
            "then `kamiyo replay --failed`"
            if unmapped
            else "fix the cause shown, then `kamiyo replay --failed`"
        )
        findings.append(
            Finding(
                step,
                FAIL,
                f"{state.parked} event(s) parked as failed: {listed}",
                todo,
                option=1 if unmapped else None,
                cause="parked",
            )
        )
    if unlinked:
        findings.append(
            Finding(
                step,
                WARN,
                f"unlinked customer: {unlinked} subscription(s) wait for an event naming their customer's email",
                "they apply by themselves once Stripe sends it; for a user waiting now, Option 5 (temporary)",
                option=None,
            )
        )
    if not findings:
        findings.append(
            Finding(
                step,
                OK,
                f"{state.workers_alive} worker(s) alive, {state.backlog} pending, no parked failures",
            )
        )
    return findings


def diagnose_worker_restarts(
    worker_check: Mapping[str, Any] | None, restarts_counted: float | None = None, *, now: float
) -> Finding | None:
    """A worker that died and was restarted, from the webhook health's worker check (count and
    last error of ``kamiyo serve``'s own worker) or else ``webhook_worker_restarts_total``."""
    step = "Processing"
    check = worker_check or {}
    count = check.get("in_process_worker_restarts")
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        if restarts_counted:
            return Finding(
                step,
                WARN,
                f"a worker died and was restarted {restarts_counted:.0f} time(s) (webhook_worker_restarts_total)",
                "look for `worker thread died` in the service's log: the error and its traceback are there",
            )
        return None
    error = check.get("in_process_worker_last_error")
    last = f"; last error {clean(str(error))[:300]}" if error else ""
    died_at = check.get("in_process_worker_last_died_at")
    if isinstance(died_at, (int, float)) and not isinstance(died_at, bool):
        last += f" ({max(0.0, now - died_at) / 60:.0f} min ago)"
    found = f"worker thread died {count} time(s){last}"
    if check.get("in_process_worker") is False:
        return Finding(
            step,
            FAIL,
            f"{found}; it is not running now and is being restarted",
            "look for `worker thread died` in the service's log; if it keeps dying, fix the cause and restart",
            option=1,
            cause="worker_down",
        )
    return Finding(
        step,
        WARN,
        f"{found}; the service restarted it",
        "look for `worker thread died` in the service's log: the error and its traceback are there",
    )


def restarts_from_metrics(text: str) -> float | None:
    """``webhook_worker_restarts_total`` from a /metrics page, or None when it has none."""
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "webhook_worker_restarts_total"
    ]
    return sum(found) if found else None


def diagnose_housekeeping(checks: list[Check]) -> list[Finding]:
    """Stripe's mode and the inbox's retention, as the webhook health checks judge them: a warning
    (both modes arriving to a service that takes both; pruning failing), never a failure."""
    todo = {
        "stripe_mode": "set STRIPE_MODE=live (or test) and restart: the other mode's events are then ignored",
        "retention": "look for `inbox retention failed` in the worker's log",
    }
    steps = {"stripe_mode": "Stripe mode", "retention": "Retention"}
    return [
        Finding(steps[c.name], c.status, c.detail, todo[c.name] if c.status == WARN else "")
        for c in checks
        if c.name in steps
    ]


def diagnose_drift(unexplained: Sequence[DriftView]) -> Finding:
    """Users whose stored tier or status no subscription, override or audit entry explains, as
    ``kamiyo users drift`` finds them: the trail of the runbook's Option 5 done by hand in SQL (an
    ``UPDATE users`` nobody recorded). A failure, because the next webhook or sync for such a user
    undoes the edit silently; it names the first users and the two commands that resolve it."""
    step = "Drift"
    if not unexplained:
        return Finding(step, OK, "every user's stored tier is what subscriptions, overrides and the audit log explain")
    named = ", ".join(
        f"{clean(d.email)} (stored {_state(d.stored.tier, d.stored.status)}, "
        f"expected {_state(d.expected.tier, d.expected.status)})"
        for d in unexplained[:DRIFT_NAMED]
    )
    more = f" and {len(unexplained) - DRIFT_NAMED} more" if len(unexplained) > DRIFT_NAMED else ""
    first = unexplained[0]
    email, tier = clean(first.email), clean(first.stored.tier)
    return Finding(
        step,
        FAIL,
        f"{len(unexplained)} user(s) with a tier or status nothing explains (edited by hand in SQL, the runbook's "
        f"Option 5 without a record?): {named}{more}",
        f'to keep it, audited: `kamiyo users set-tier {email} {tier} --reason "..."`; to return to Stripe\'s '
        f"state: `kamiyo sync --email {email}`; `kamiyo users drift` lists every user",
        option=5,
        cause="drift",
    )


def _state(tier: str, status: str | None) -> str:
    return clean(f"{tier}/{status or '-'}")


def diagnose_stripe(
    endpoints: list[Any] | None, undelivered: Any | None, *, configured: bool, error: str = ""
) -> list[Finding]:
    """Step 4 without a browser: the endpoint as Stripe sees it, and what Stripe failed to deliver."""
    step = "Step 4: Stripe"
    if not configured:
        return [Finding(step, SKIPPED, "no STRIPE_SECRET_KEY: check https://dashboard.stripe.com/webhooks by hand")]
    if endpoints is None:
        return [Finding(step, WARN, f"Stripe's API could not be read: {error}", "check the Dashboard by hand")]
    ours = [e for e in endpoints if urllib.parse.urlsplit(e.url).path.rstrip("/") == WEBHOOK_PATH]
    if not ours:
        return [
            Finding(
                step,
                FAIL,
                f"no webhook endpoint in Stripe points at {WEBHOOK_PATH} ({len(endpoints)} endpoint(s) listed)",
                "create it with the runbook's seven events, copy its secret into STRIPE_WEBHOOK_SECRET, restart",
                option=4,
                cause="endpoint_missing",
            )
        ]
    findings = []
    for endpoint in ours:
        described = f"{endpoint.url} is {endpoint.status}, API version {endpoint.api_version or 'account default'}"
        missing = endpoint.missing_events()
        if endpoint.status != "enabled":
            findings.append(
                Finding(
                    step,
                    FAIL,
                    f"{described}: Stripe disabled it after repeated failures and will not re-send what it missed",
                    "re-enable or recreate the endpoint, then recover missed events (`kamiyo backfill`, or replay "
                    "from the Dashboard)",
                    option=4,
                    cause="endpoint_disabled",
                )
            )
        elif missing:
            findings.append(
                Finding(
                    step,
                    FAIL,
                    f"{described}, but it is not subscribed to {', '.join(missing)}",
                    f"add the runbook's events ({', '.join(RUNBOOK_EVENTS)}) to the endpoint",
                    option=4,
                    cause="endpoint_events",
                )
            )
        else:
            findings.append(Finding(step, OK, f"{described}, subscribed to the runbook's seven events"))
    if undelivered is not None:
        count = f"{'at least ' if undelivered.capped else ''}{undelivered.count}"
        if undelivered.count:
            findings.append(
                Finding(
                    step,
                    WARN,
                    f"{count} event(s) of the last 30 days not delivered to some endpoint (delivery_success=false)",
                    "once fixed, Stripe retries them for up to 3 days; recover older ones with `kamiyo backfill`",
                )
            )
        else:
            findings.append(Finding(step, OK, "Stripe reports no undelivered event (delivery_success=false)"))
    return findings


# -- gathering the facts ---------------------------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes

    def json(self) -> dict[str, Any] | None:
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


def http(
    method: str, url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> HttpAnswer:
    """One request; an HTTP error status is an answer, a transport error raises OSError."""
    request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked by the caller
        url, data=body, method=method, headers={"User-Agent": USER_AGENT, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return HttpAnswer(response.status, response.read())
    except urllib.error.HTTPError as exc:
        return HttpAnswer(exc.code, exc.read())
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


def failures_from_metrics(text: str) -> dict[str, float]:
    """``webhook_failures_total`` by reason, from a /metrics page."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "webhook_failures":
            for sample in family.samples:
                if sample.name == "webhook_failures_total":
                    reason = sample.labels.get("reason", "")
                    found[reason] = found.get(reason, 0.0) + sample.value
    return found


def _probe_price(settings: Settings) -> dict[str, Any]:
    """A price the service maps to a tier, so the probe exercises the whole apply path."""
    for key in settings.price_tiers.by_key:
        if key.startswith(("price_", "plan_")):
            return synthetic.price(key)
        return synthetic.price("price_kamiyo_probe", lookup_key=key)
    return synthetic.price("price_kamiyo_probe", tier="pro")


class Doctor:
    """Gathers the facts for every step and diagnoses them. One use: ``run()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str,
        engine: Engine | None,
        stripe: StripeWebhookView | None = None,
        db_error: str = "",
        apply_timeout: float = 15.0,
        http_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.url = url.rstrip("/")
        self.engine = engine
        self.stripe = stripe
        self.db_error = db_error
        self.apply_timeout = apply_timeout
        self.http_timeout = http_timeout
        self.clock = clock

    def run(self) -> Diagnosis:
        diagnosis = Diagnosis(self.url)
        add = diagnosis.findings.append
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if parts.scheme == "https" else 80)

        listening, error = self._listening(host, port)
        add(diagnose_port(host, port, listening, error))
        ping_ok = False
        health: dict[str, Any] | None = None
        metrics_text: str | None = None
        service_writer: str | None = None
        if listening:
            ping = self._ping()
            add(ping)
            ping_ok = ping.status == OK or ping.cause == "secret_missing"
            health = self._get_json(WEBHOOK_PATH + "/health")
            metrics_text = self._get_text("/metrics")
            writer = (self._get_json("/health") or {}).get("writer")
            service_writer = writer if writer in writer_health.STATES else None
        add(diagnose_writer(service_writer, self._write_probe()))

        rows: list[DeliveryRow] | None = None
        state: ServiceState | None = None
        db_error = self.db_error
        if self.engine is not None:
            now = self.clock()
            try:
                rows = delivery_rows(self.engine, now - WINDOW_SECONDS, now + 60)
                state = read_state(self.engine, now=now)
            except Exception as exc:  # noqa: BLE001 - an unreachable database is a finding
                db_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                rows, state = None, None

        service = (health or {}).get("service") or {}
        started_at = service.get("started_at") if isinstance(service.get("started_at"), (int, float)) else None
        metrics_failures = failures_from_metrics(metrics_text) if metrics_text else None
        for finding in diagnose_failures(rows, metrics_failures, started_at=started_at):
            add(finding)

        secret_check = None
        if health is not None:
            secret_check = next((c for c in health.get("checks", []) if c.get("name") == "secret"), None)
        add(diagnose_secret(self.settings.webhook_secrets, secret_check))

        if ping_ok and self.settings.webhook_secrets and diagnosis.findings[-1].status != FAIL:
            add(self._probe(state is not None))
        else:
            add(Finding("End to end", SKIPPED, "needs a reachable endpoint and a matching secret"))

        if self.engine is not None and state is None:
            add(diagnose_processing(None, [], 0, db_error=db_error)[0])
        elif self.engine is not None and state is not None:
            try:
                # Read again: the probe above may just have shown whether a worker is alive.
                state = read_state(self.engine, now=self.clock())
                parked = parked_reasons(self.engine) if state.parked else []
                processing = diagnose_processing(state, parked, self._unlinked())
            except Exception as exc:  # noqa: BLE001 - the database went away during the run
                processing = diagnose_processing(None, [], 0, db_error=exc.__class__.__name__)
            for finding in processing:
                add(finding)
            for finding in self._housekeeping():
                add(finding)
            drift = self._drift()
            if drift is not None:
                add(drift)
        else:
            add(Finding("Processing", SKIPPED, f"no database to read ({db_error or 'not configured'})"))
        # The public health names each check's state only; its details (the worker's restarts and
        # last error) come from the admin API, for a doctor run with the service's admin token.
        full = self._admin_health() if listening else None
        worker_check = next((c for c in (full or health or {}).get("checks", []) if c.get("name") == "worker"), None)
        restarted = diagnose_worker_restarts(
            worker_check, restarts_from_metrics(metrics_text) if metrics_text else None, now=self.clock()
        )
        if restarted is not None:
            add(restarted)

        for finding in self._stripe():
            add(finding)
        return diagnosis

    # -- steps that talk to the service ---------------------------------------------------

    def _listening(self, host: str, port: int) -> tuple[bool, str]:
        try:
            with socket.create_connection((host, port), timeout=self.http_timeout):
                return True, ""
        except OSError as exc:
            return False, exc.strerror or exc.__class__.__name__

    def _write_probe(self) -> str | None:
        """Doctor's own write to the database, as the inbox writer probes it: None when it
        committed, the fault kind when the database refused it, "skipped" without a database."""
        if self.engine is None:
            return "skipped"
        try:
            with self.engine.connect() as connection:
                connection.execution_options(**{WRITE_WAIT_OPTION: PROBE_WRITE_WAIT})
                with connection.begin():
                    if connection.dialect.name == "postgresql":
                        # Bounded like SQLite's wait above: a held lock must not hang the doctor.
                        connection.execute(text(f"SET LOCAL lock_timeout = '{PROBE_WRITE_WAIT:g}s'"))
                        connection.execute(text(f"SET LOCAL statement_timeout = '{3 * PROBE_WRITE_WAIT:g}s'"))
                    write_probe(connection)
        except Exception as exc:  # noqa: BLE001 - the database may be the thing that is broken
            return fault_kind(exc) if is_database_fault(exc) else f"unavailable ({describe(exc)})"
        return None

    def _ping(self) -> Finding:
        headers = {"Content-Type": "application/json"}
        if self.settings.webhook_secrets:
            # Marks the ping as doctor's, so the service leaves it out of its failure counts; only
            # a holder of the webhook secret can make this header.
            headers[PROBE_HEADER] = probe_header(self.settings.webhook_secrets[0], int(time.time()))
        try:
            answer = http(
                "POST",
                self.url + WEBHOOK_PATH,
                body=b'{"type":"ping"}',
                headers=headers,
                timeout=self.http_timeout,
            )
        except OSError as exc:
            return diagnose_ping(None, None, str(exc))
        return diagnose_ping(answer.status, answer.json())

    def _get_json(self, path: str) -> dict[str, Any] | None:
        try:
            return http("GET", self.url + path, timeout=self.http_timeout).json()
        except OSError:
            return None

    def _admin_health(self) -> dict[str, Any] | None:
        """The full webhook health from ``/admin/api/health``, with an admin token of this
        environment (``KAMIYO_ADMIN_TOKEN``, else the first of ``KAMIYO_ADMIN_TOKENS``); else None."""
        token = self.settings.admin_token or next((t for _name, t in self.settings.admin_tokens), None)
        if not token:
            return None
        try:
            answer = http(
                "GET",
                self.url + "/admin/api/health",
                headers={"Authorization": f"Bearer {token}"},
                timeout=self.http_timeout,
            )
        except OSError:
            return None
        return answer.json() if answer.status == 200 else None

    def _get_text(self, path: str) -> str | None:
        try:
            answer = http("GET", self.url + path, timeout=self.http_timeout)
        except OSError:
            return None
        return answer.body.decode("utf-8", "replace") if answer.status == 200 else None

    def _probe(self, can_verify: bool) -> Finding:
        """A signed synthetic event through ingest and apply, then removed again."""
        step = "End to end"
        token = secrets.token_hex(8)
        customer_id, sub_id = f"cus_kamiyo_probe_{token}", f"sub_kamiyo_probe_{token}"
        event = synthetic.trigger_event(
            "customer.subscription.created",
            email="",
            price_obj=_probe_price(self.settings),
            customer_id=customer_id,
            sub_id=sub_id,
            livemode=self.settings.stripe_mode == LIVE,  # the service's mode, so that it applies the probe
        )
        event["id"] = PROBE_EVENT_PREFIX + token
        body = orjson.dumps(event)
        started = time.monotonic()
        try:
            try:
                answer = http(
                    "POST",
                    self.url + WEBHOOK_PATH,
                    body=body,
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "Stripe-Signature": signature_header(body, self.settings.webhook_secrets[0], int(time.time())),
                    },
                    timeout=self.http_timeout,
                )
            except OSError as exc:
                return Finding(
                    step, FAIL, f"the signed test event got no answer: {exc}", option=1, cause="service_down"
                )
            reason = (answer.json() or {}).get("reason")
            if answer.status != 200:
                if reason == "invalid_signature":
                    return Finding(
                        step,
                        FAIL,
                        "a test event signed with this environment's secret was refused (invalid signature): "
                        "the service and this environment disagree on the secret",
                        "make STRIPE_WEBHOOK_SECRET the endpoint's signing secret everywhere and restart",
                        option=2,
                        cause="secret_mismatch",
                    )
                if reason == "timestamp":
                    return Finding(
                        step,
                        FAIL,
                        "a freshly signed test event was refused for its timestamp: this machine's clock and the "
                        "service's disagree",
                        "synchronise the clocks (NTP)",
                        cause="clock_skew",
                    )
                return Finding(
                    step,
                    FAIL,
                    f"the signed test event was answered {answer.status} {reason or ''}".rstrip(),
                    "restart the service and check its log",
                    option=1,
                    cause="probe_failed",
                )
            if not can_verify or self.engine is None:
                return Finding(step, WARN, "the signed test event was stored (200); applying it could not be checked")
            status, error = self._wait_applied(event["id"])
            took = time.monotonic() - started
            if status == InboxStatus.APPLIED:
                return Finding(step, OK, f"a signed test event was stored and applied in {took:.1f} s, then removed")
            if status == InboxStatus.PENDING:
                return Finding(
                    step,
                    FAIL,
                    f"worker not running: the signed test event was stored but not applied within "
                    f"{self.apply_timeout:.0f} s",
                    "restart the service (WORKER_IN_PROCESS=true) or start `kamiyo worker`",
                    option=1,
                    cause="worker_down",
                )
            if status == InboxStatus.IGNORED:  # built in this environment's Stripe mode, not the service's
                return Finding(
                    step,
                    FAIL,
                    f"the service ignored the signed test event: {error or 'no reason recorded'}",
                    "give this environment the service's STRIPE_MODE (or STRIPE_SECRET_KEY) and run doctor again",
                    cause="probe_failed",
                )
            return Finding(
                step,
                FAIL,
                f"the signed test event ended {status}: {error or 'no error recorded'}",
                "see Processing below",
                cause="probe_failed",
            )
        finally:
            self._remove_probe(event["id"], sub_id, customer_id)

    def _wait_applied(self, event_id: str) -> tuple[str | None, str | None]:
        assert self.engine is not None
        deadline = time.monotonic() + self.apply_timeout
        status: str | None = None
        error: str | None = None
        while True:
            with self.engine.connect().execution_options(readonly=True) as connection:
                row = connection.execute(
                    select(events_table.c.status, events_table.c.last_error, events_table.c.detail).where(
                        events_table.c.stripe_event_id == event_id
                    )
                ).first()
            if row is not None:
                status = row.status
                error = row.last_error or (row.detail if status == InboxStatus.IGNORED else None)
                if status != InboxStatus.PENDING or time.monotonic() > deadline:
                    return status, error
            elif time.monotonic() > deadline:
                return None, "the event is not in the inbox"
            time.sleep(0.05)

    def _remove_probe(self, event_id: str, sub_id: str, customer_id: str) -> None:
        """Delete every row the probe made; none of them is linked to a user."""
        if self.engine is None:
            return
        try:
            with self.engine.begin() as connection:
                connection.execute(delete(events_table).where(events_table.c.stripe_event_id == event_id))
                connection.execute(delete(subscriptions_table).where(subscriptions_table.c.id == sub_id))
                connection.execute(
                    delete(customers_table).where(
                        customers_table.c.id == customer_id, customers_table.c.user_id.is_(None)
                    )
                )
        except Exception:  # noqa: BLE001, S110 - the database may be the thing that is broken
            pass

    def _housekeeping(self) -> list[Finding]:
        assert self.engine is not None
        try:
            modes = recent_modes(self.engine) if self.settings.stripe_mode is None else frozenset[str]()
            checks = [
                check_stripe_mode(self.settings.stripe_mode, modes),
                check_retention(retention_status(self.engine), self.settings.inbox_retention_days, self.clock()),
            ]
        except Exception:  # noqa: BLE001 - the database went away during the run: Processing said so
            return []
        return diagnose_housekeeping(checks)

    def _drift(self) -> Finding | None:
        assert self.engine is not None
        try:
            with self.engine.connect().execution_options(readonly=True) as connection:
                return diagnose_drift(unexplained_drift(connection, tiers=self.settings.price_tiers))
        except Exception:  # noqa: BLE001 - the database went away during the run: Processing said so
            return None

    def _unlinked(self) -> int:
        assert self.engine is not None
        subs, customers = subscriptions_table, customers_table
        with self.engine.connect().execution_options(readonly=True) as connection:
            return int(
                connection.execute(
                    select(func.count())
                    .select_from(subs.join(customers, customers.c.id == subs.c.customer_id))
                    .where(customers.c.user_id.is_(None), subs.c.status.in_(("active", "trialing", "past_due")))
                ).scalar_one()
            )

    def _stripe(self) -> list[Finding]:
        if self.stripe is None:
            return diagnose_stripe(None, None, configured=False)
        try:
            endpoints = self.stripe.webhook_endpoints()
            undelivered = self.stripe.undelivered_events()
        except Exception as exc:  # noqa: BLE001 - network, auth, rate limit: all reported
            return diagnose_stripe(None, None, configured=True, error=f"{exc.__class__.__name__}: {exc}"[:300])
        return diagnose_stripe(endpoints, undelivered, configured=True)

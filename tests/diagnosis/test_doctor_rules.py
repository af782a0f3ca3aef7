"""doctor's rules, facts in and findings out: thresholds, timing and which cause wins the verdict."""

from __future__ import annotations

from kamiyo.diagnosis.doctor import (
    FAIL,
    OK,
    WARN,
    Diagnosis,
    Finding,
    diagnose_drift,
    diagnose_failures,
    diagnose_ping,
    diagnose_secret,
)
from kamiyo.operations.users import DriftView, StateView
from kamiyo.telemetry.delivery_stats import DeliveryRow
from kamiyo.telemetry.webhook_health import fingerprint

T0 = 1_800_000_000


def _rows(accepted: int, **rejected: int) -> list[DeliveryRow]:
    rows = [DeliveryRow(T0, "accepted", "", "invoice.paid", accepted)]
    rows += [DeliveryRow(T0 + 60, "rejected", reason, "", n) for reason, n in rejected.items()]
    return rows


def test_a_scanners_few_bad_signatures_among_many_deliveries_only_warn() -> None:
    findings = diagnose_failures(_rows(500, invalid_signature=2), None, started_at=None)
    assert [f.status for f in findings] == [WARN]


def test_an_invalid_signature_spike_long_after_the_start_is_a_mismatch_but_not_called_a_deploy() -> None:
    findings = diagnose_failures(_rows(10, invalid_signature=20), None, started_at=T0 - 86400)
    assert [(f.status, f.cause, f.option) for f in findings] == [(FAIL, "secret_mismatch", 2)]
    assert "right after" not in findings[0].found


def test_a_clean_hour_is_ok_and_mentions_the_metrics_since_start() -> None:
    findings = diagnose_failures(_rows(40), {"invalid_signature": 3.0, "timestamp": 0.0}, started_at=None)
    assert findings[0].status == OK
    assert "invalid_signature 3" in findings[0].found


def test_a_ping_answered_404_or_500_means_a_service_issue_with_option_1() -> None:
    for status in (404, 500, 502):
        finding = diagnose_ping(status, {"detail": "Not Found"})
        assert (finding.status, finding.option, finding.cause) == (FAIL, 1, "service_down")


def test_the_running_service_sharing_one_of_several_secrets_is_enough() -> None:
    service = {"status": "ok", "configured": 2, "fingerprints": [fingerprint("whsec_new"), fingerprint("whsec_old")]}
    assert diagnose_secret(("whsec_new",), service).status == OK


def test_the_most_basic_failure_wins_the_verdict() -> None:
    diagnosis = Diagnosis(
        "http://127.0.0.1:8000",
        [
            Finding("Processing", FAIL, "parked", cause="parked", option=1),
            Finding("Step 1", FAIL, "mismatch", cause="secret_mismatch", option=2),
            Finding("Processing", FAIL, "no worker", cause="worker_down", option=1),
        ],
    )
    assert diagnosis.verdict is not None
    assert diagnosis.verdict.cause == "secret_mismatch"
    assert "Verdict: Option 2: Update Webhook Secret. mismatch" in diagnosis.to_text()


def test_mixed_stripe_modes_and_a_failing_retention_are_warnings_with_what_to_do() -> None:
    from kamiyo.diagnosis.doctor import WARN, diagnose_housekeeping
    from kamiyo.processing.retention import RetentionStatus
    from kamiyo.telemetry.webhook_health import check_retention, check_stripe_mode

    failing = RetentionStatus(1.0, 2.0, 4, "OperationalError: database is locked", 0, False)
    mode, retention = diagnose_housekeeping(
        [check_stripe_mode(None, frozenset({"live", "test"})), check_retention(failing, 90, 10.0)]
    )
    assert (mode.step, mode.status) == ("Stripe mode", WARN)
    assert "STRIPE_MODE=live" in mode.todo
    assert (retention.step, retention.status) == ("Retention", WARN)
    assert "failed 4 times in a row: OperationalError: database is locked" in retention.found
    assert "inbox retention failed" in retention.todo
    calm = diagnose_housekeeping([check_stripe_mode("live", frozenset()), check_retention(None, 90, 10.0)])
    assert [(f.status, f.todo) for f in calm] == [("ok", ""), ("ok", "")]


def test_the_writer_finding_names_each_way_the_service_cannot_store() -> None:
    from kamiyo.diagnosis.doctor import diagnose_writer

    assert diagnose_writer("ok", None).status == OK
    causes = {
        ("dead", None): "writer_dead",
        ("stalled", None): "writer_stalled",
        ("locked", None): "database_locked",
        ("ok", "locked"): "database_locked",  # the service has not noticed yet; doctor's own write has
        (None, "locked"): "database_locked",
        ("full", None): "database_full",
        (None, "full"): "database_full",
        ("failing", None): "database_down",
    }
    for (service, local), cause in causes.items():
        finding = diagnose_writer(service, local)
        assert (finding.status, finding.cause) == (FAIL, cause), (service, local)
        assert finding.todo
    stalled = diagnose_writer("stalled", None)
    assert "kill -CONT" in stalled.todo or "-CONT" in stalled.todo
    assert stalled.option == 1


def test_a_stalled_writer_outranks_a_worker_that_is_down_in_the_verdict() -> None:
    from kamiyo.diagnosis.doctor import diagnose_writer

    diagnosis = Diagnosis(
        "http://127.0.0.1:8000",
        [Finding("Processing", FAIL, "no worker", cause="worker_down", option=1), diagnose_writer("stalled", None)],
    )
    assert diagnosis.verdict is not None
    assert diagnosis.verdict.cause == "writer_stalled"


def _drifted(n: int) -> list[DriftView]:
    return [
        DriftView(f"user{i}@example.com", StateView("pro", "active"), StateView("free", None), None)
        for i in range(1, n + 1)
    ]


def test_no_unexplained_drift_is_ok() -> None:
    assert diagnose_drift([]).status == OK


def test_unexplained_drift_fails_naming_the_first_three_users_and_both_ways_out() -> None:
    finding = diagnose_drift(_drifted(5))
    assert (finding.status, finding.cause, finding.option) == (FAIL, "drift", 5)
    assert "user1@example.com (stored pro/active, expected free/-)" in finding.found
    assert "user3@example.com" in finding.found
    assert "user4@example.com" not in finding.found
    assert finding.found.endswith(" and 2 more")
    assert '`kamiyo users set-tier user1@example.com pro --reason "..."`' in finding.todo
    assert "`kamiyo sync --email user1@example.com`" in finding.todo


def test_drift_is_the_verdict_only_when_nothing_more_basic_fails() -> None:
    drift = diagnose_drift(_drifted(1))
    down = Finding("End to end", FAIL, "worker not running", option=1, cause="worker_down")
    assert Diagnosis("http://x", [drift, down]).verdict == down
    assert Diagnosis("http://x", [drift]).verdict == drift


def test_an_email_that_would_drive_the_terminal_is_shown_escaped() -> None:
    [item] = _drifted(1)
    finding = diagnose_drift([DriftView("evil\x1b[2J@example.com", item.stored, item.expected, None)])
    assert "\x1b" not in finding.found + finding.todo

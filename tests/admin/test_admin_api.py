"""The JSON admin API and the sign-in flow, against the app in-process (over HTTPS, as a browser would)."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from starlette.routing import Route

from admin.app_client import ADMIN_TOKEN, BEARER, AppClient, Console
from admin.events import (
    PAYMENT_SECRET,
    UNMAPPED_PRICE,
    customer_created,
    payment_with_client_secret,
    subscription_created,
)
from e2e.harness import wait_until
from kamiyo import synthetic
from kamiyo.domain.outcomes import CustomerOutcome, LinkResult, Outcome, SubscriptionOutcome, UserChange
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.operations.overrides import set_override
from kamiyo.operations.users import show_user
from kamiyo.web.admin_auth import SESSION_COOKIE
from kamiyo.web.admin_models import DeliveryAnswer
from kamiyo.web.app import WEBHOOK_PATH, create_app
from support import PRICE_TIERS, make_settings, record_outcome, signed

ANN = "ann@example.com"


def _failed_subscription(console: Console, email: str = ANN, customer_id: str = "cus_ann") -> dict:
    """A linked customer whose new subscription names a price no tier is configured for."""
    console.deliver(customer_created(email, customer_id))
    event = subscription_created(customer_id, UNMAPPED_PRICE)
    console.deliver(event)
    console.drain()
    return event


def _sign_in(console: Console, name: str = "ann") -> str:
    """Sign in through the form; return the page's CSRF token."""
    response = console.client.post("/admin/login", data={"token": ADMIN_TOKEN, "name": name}, follow_redirects=False)
    assert response.status_code == 303
    page = console.client.get("/admin")
    assert page.status_code == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert match
    return match.group(1)


# -- switched off ---------------------------------------------------------------------------


def test_console_and_admin_api_are_not_found_without_an_admin_token(tmp_path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'k.db'}")
    with AppClient(create_app(settings, run_worker=False)) as client:
        for path in ("/admin", "/admin/api/health", "/admin/api/openapi.json", "/admin/login"):
            response = client.get(path, headers={"Authorization": "Bearer anything-at-all-0000"})
            assert response.status_code == 404, path


# -- the schema -----------------------------------------------------------------------------


def test_every_admin_api_route_and_method_is_in_the_openapi_schema_and_the_schema_lists_nothing_else(
    console: Console,
) -> None:
    """Probe each /admin/api route of the running app with every method; what answers is documented."""
    schema = console.get("/admin/api/openapi.json").json()
    documented = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    served = set()
    api_paths = [
        route.path
        for route in console.client.app.routes
        if isinstance(route, Route) and route.path.startswith("/admin/api/") and "{rest" not in route.path
    ]
    assert api_paths
    for path in api_paths:
        concrete = path.replace("{event_id}", "evt_missing")
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            response = console.client.request(
                method, concrete, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, content=b"{}"
            )
            if response.status_code != 405:
                served.add((method, path))
    assert served == documented
    assert schema["openapi"].startswith("3.")
    for path, ops in schema["paths"].items():
        for method, operation in ops.items():
            assert operation["summary"], (method, path)
            assert "401" in operation["responses"], (method, path)
            params = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), (method, path)


# -- deliveries -----------------------------------------------------------------------------


def test_deliveries_are_newest_first_with_a_mark_for_each_outcome_including_duplicates_and_rejections(
    console: Console,
) -> None:
    console.deliver(customer_created(ANN, "cus_ann"))  # applied
    failed = subscription_created("cus_ann", UNMAPPED_PRICE)
    console.deliver(failed)
    ignored = synthetic.event("charge.refunded", {"id": "ch_1", "object": "charge", "customer": "cus_ann"})
    console.deliver(ignored)
    console.drain()
    pending = customer_created("bob@example.com", "cus_bob")
    console.deliver(pending)
    console.deliver(failed)  # a duplicate: answered 200, not stored twice
    body, headers = signed(customer_created("eve@example.com", "cus_eve"), "whsec_not_ours_0000000000000")
    assert console.client.post(WEBHOOK_PATH, content=body, headers=headers).status_code == 400

    def counted() -> dict[str, Any]:  # delivery counts are written at most once a second
        data: dict[str, Any] = console.get("/admin/api/deliveries").json()
        return data if data["counts"].get("duplicate") and data["counts"].get("rejected") else {}

    data = wait_until(counted, timeout=10, what="the duplicate and the rejection counted")
    events = [d for d in data["deliveries"] if d["kind"] == "event"]
    assert [d["event_id"] for d in events][:3] == [pending["id"], ignored["id"], failed["id"]]
    marks = {d["event_id"]: d["mark"] for d in events}
    assert (marks[pending["id"]], marks[ignored["id"]], marks[failed["id"]]) == ("pending", "ignored", "failed")
    assert sorted(marks.values()) == ["applied", "failed", "ignored", "pending"]
    counted = {d["mark"]: d for d in data["deliveries"] if d["kind"] == "count"}
    assert counted["duplicate"]["count"] == 1
    assert counted["duplicate"]["type"] == "customer.subscription.created"
    assert counted["rejected"]["reason"] == "invalid_signature"
    assert data["counts"] == {"applied": 1, "pending": 1, "failed": 1, "ignored": 1, "duplicate": 1, "rejected": 1}
    assert UNMAPPED_PRICE in next(d for d in events if d["mark"] == "failed")["error"]
    assert "charge.refunded" in data["types"]


def test_deliveries_filter_by_status_type_and_customer_id_or_email(console: Console) -> None:
    failed = _failed_subscription(console)
    console.deliver(customer_created("bob@example.com", "cus_bob"))
    bob_sub = subscription_created("cus_bob")
    console.deliver(bob_sub)
    console.drain()

    def ids(**params: str) -> list[str]:
        listed = console.get("/admin/api/deliveries", params=params).json()["deliveries"]
        return [d["event_id"] for d in listed if d["kind"] == "event"]

    assert ids(status="failed") == [failed["id"]]
    assert ids(type="customer.subscription.created") == [bob_sub["id"], failed["id"]]
    assert len(ids(customer="cus_bob")) == 2
    assert bob_sub["id"] in ids(customer="bob@example.com")
    assert failed["id"] not in ids(customer="bob@example.com")
    assert ids(customer="cus_%") == []  # a LIKE wildcard is a character, not a pattern
    assert ids(status="applied", customer="cus_ann") == [ids(customer="cus_ann")[-1]]
    assert console.get("/admin/api/deliveries", params={"status": "weird"}).status_code == 400


def test_one_delivery_shows_its_error_and_its_payload_pretty_printed_with_secrets_redacted(console: Console) -> None:
    failed = _failed_subscription(console)
    payment = payment_with_client_secret("cus_ann")
    console.deliver(payment)
    console.drain()

    shown = console.get(f"/admin/api/deliveries/{failed['id']}").json()
    assert shown["mark"] == "failed"
    assert UNMAPPED_PRICE in shown["error"]
    assert shown["customer"] == "cus_ann"
    assert orjson.loads(shown["payload"])["id"] == failed["id"]
    assert shown["payload"].startswith("{\n  ")  # indented

    response = console.get(f"/admin/api/deliveries/{payment['id']}")
    assert PAYMENT_SECRET not in response.text
    assert orjson.loads(response.json()["payload"])["data"]["object"]["client_secret"] == "[redacted]"
    assert console.get("/admin/api/deliveries/evt_unknown").status_code == 404


def test_one_delivery_shows_what_applying_it_did_as_documented_data_scrubbed_or_its_sentence_from_before(
    console: Console,
) -> None:
    created = customer_created(ANN, "cus_ann")
    console.deliver(created)
    sub = subscription_created("cus_ann")
    console.deliver(sub)
    console.drain()
    sub_id = sub["data"]["object"]["id"]
    outcome = Outcome(
        subscription=SubscriptionOutcome(sub_id, "active", "pro", stored=True),
        customer=CustomerOutcome("cus_ann", LinkResult.ALREADY_LINKED, user_id=1),
        users=(UserChange(1, ANN, "free", "pro", None, "active", f"subscription {sub_id} active"),),
        note=f"a pasted key {PAYMENT_SECRET}",
    )
    record_outcome(console.engine, sub["id"], outcome, outcome.describe())
    record_outcome(console.engine, created["id"], None, "customer cus_ann linked to user 1 by email")

    response = console.get(f"/admin/api/deliveries/{sub['id']}")
    assert PAYMENT_SECRET not in response.text
    shown = response.json()["outcome"]
    assert shown["subscription"] == {"id": sub_id, "status": "active", "tier": "pro", "stored": True}
    assert shown["customer"] == {"id": "cus_ann", "link": "already_linked", "user_id": 1, "linked_by": None}
    assert shown["users"] == [
        {
            "user_id": 1,
            "email": ANN,
            "tier_from": "free",
            "tier_to": "pro",
            "status_from": None,
            "status_to": "active",
            "why": f"subscription {sub_id} active",
        }
    ]
    assert shown["note"] == "a pasted key [redacted]"
    # Exactly what the answer model (and so the OpenAPI schema) describes, field by field.
    answer = response.json()
    assert DeliveryAnswer.model_validate(answer).model_dump(mode="json", exclude_unset=True) == answer

    before = console.get(f"/admin/api/deliveries/{created['id']}").json()
    assert (before["outcome"], before["detail"]) == (None, "customer cus_ann linked to user 1 by email")


def test_one_applied_delivery_shows_the_outcome_the_worker_recorded(console: Console) -> None:
    console.deliver(customer_created(ANN, "cus_ann"))
    sub = subscription_created("cus_ann")
    console.deliver(sub)
    console.drain()
    shown = console.get(f"/admin/api/deliveries/{sub['id']}").json()["outcome"]
    assert shown["subscription"]["id"] == sub["data"]["object"]["id"]
    assert shown["customer"]["id"] == "cus_ann"
    [change] = shown["users"]
    assert (change["email"], change["tier_from"], change["tier_to"]) == (ANN, "free", "pro")
    assert change["status_to"] == "active"


# -- replay ---------------------------------------------------------------------------------


def test_replay_after_the_price_is_mapped_applies_the_event_and_audits_who_and_why(console: Console) -> None:
    failed = _failed_subscription(console)
    fixed = dataclasses.replace(
        console.settings, price_tiers=parse_price_tiers(PRICE_TIERS + f",{UNMAPPED_PRICE}=enterprise")
    )
    # Settings are read at start: the fixed mapping arrives with a restarted app.
    with AppClient(create_app(fixed, engine=console.engine, run_worker=False)) as client:
        response = client.post(
            "/admin/api/replay",
            json={"event_id": failed["id"], "reason": "mapped the team price"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Kamiyo-Actor": "ops-bot"},
        )
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert (result["status_before"], result["status_after"]) == ("failed", "applied")
    assert console.get(f"/admin/api/deliveries/{failed['id']}").json()["mark"] == "applied"
    entry = console.get("/admin/api/audit").json()["entries"][0]
    # The shared token proves only that it was the shared token; the header's name is a claim.
    assert (entry["action"], entry["actor"], entry["claimed_by"], entry["target"], entry["reason"]) == (
        "replay",
        "api:shared",
        "ops-bot",
        failed["id"],
        "mapped the team price",
    )


def test_a_dry_run_replay_shows_the_outcome_and_changes_nothing(console: Console) -> None:
    failed = _failed_subscription(console)
    response = console.post("/admin/api/replay", {"event_id": failed["id"], "dry_run": True})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["status_after"] == "failed"
    assert response.json()["dry_run"] is True
    assert console.get(f"/admin/api/deliveries/{failed['id']}").json()["mark"] == "failed"
    assert console.get("/admin/api/audit").json()["entries"] == []


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"event_id": "evt_x"}, "reason", "reason is required"),
        ({"event_id": "evt_x", "reason": "  "}, "reason", "reason must be words (not only spaces)"),
        ({"reason": "why"}, "event_id", "needs an event id"),
        ({"event_id": "evt_x", "failed": True, "reason": "why"}, "event_id", "on its own"),
        ({"event_id": 5, "reason": "why"}, "event_id", "event_id must be a string"),
        ({"event_id": None, "dry_run": True}, "event_id", "event_id must be left out, not null"),
        ({"failed": "yes", "reason": "why"}, "failed", "true or false"),
        ({"since": "yesterday-ish", "reason": "why"}, "since", "since must be"),
        ({"failed": True, "dry_run": True, "limit": 0}, "limit", "limit must be at least 1"),
        ({"failed": True, "dry_run": True, "surprise": 1}, "surprise", "surprise is not a field of this body"),
    ],
)
def test_a_replay_request_that_is_incomplete_or_ambiguous_is_refused_with_400_naming_the_field(
    console: Console, body: dict, field: str, message: str
) -> None:
    response = console.post("/admin/api/replay", body)
    assert response.status_code == 400
    answer = response.json()
    assert message in answer["error"]
    assert answer["field"] == field
    assert answer["error"] == f"{field} {answer['reason']}"


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{not json", "body is not JSON"), (b"[1, 2]", "body must be a JSON object"), (b'"evt_1"', "JSON object")],
)
def test_a_replay_body_that_is_not_a_json_object_is_a_400_naming_no_field(
    console: Console, body: bytes, message: str
) -> None:
    response = console.client.post(
        "/admin/api/replay", content=body, headers={**BEARER, "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert response.json()["field"] is None


def test_a_replay_of_an_event_the_inbox_does_not_hold_is_a_404(console: Console) -> None:
    response = console.post("/admin/api/replay", {"event_id": "evt_nowhere", "reason": "why"})
    assert response.status_code == 404
    assert "no event evt_nowhere" in response.json()["error"]


def test_replay_of_every_parked_failure_replays_exactly_those(console: Console) -> None:
    first = _failed_subscription(console)
    second = _failed_subscription(console, "bob@example.com", "cus_bob")
    response = console.post("/admin/api/replay", {"failed": True, "reason": "after the fix", "dry_run": True})
    assert sorted(r["event_id"] for r in response.json()["results"]) == sorted([first["id"], second["id"]])


# -- the other views ------------------------------------------------------------------------


def test_parked_failures_are_grouped_by_reason(console: Console) -> None:
    _failed_subscription(console)
    _failed_subscription(console, "bob@example.com", "cus_bob")
    parked = console.get("/admin/api/parked").json()
    assert parked["total"] == 2
    [group] = parked["reasons"]
    assert (group["reason"], group["count"]) == ("UnmappedPrice", 2)


def test_overrides_lists_each_active_override_with_its_reason_and_expiry(console: Console) -> None:
    console.deliver(customer_created(ANN, "cus_ann"))
    console.drain()
    expires = datetime.now(UTC) + timedelta(hours=24)
    set_override(
        console.engine,
        email=ANN,
        tier="pro",
        reason="refund dispute, ticket 4411",
        expires_at=expires,
        actor="carol",
        tiers=console.settings.price_tiers,
    )
    [override] = console.get("/admin/api/overrides").json()["overrides"]
    assert (override["email"], override["tier"], override["reason"], override["set_by"]) == (
        ANN,
        "pro",
        "refund dispute, ticket 4411",
        "carol",
    )
    assert abs(datetime.fromisoformat(override["expires_at"]) - expires) < timedelta(seconds=1)


def test_user_search_answers_what_kamiyo_users_show_shows(console: Console) -> None:
    console.deliver(customer_created(ANN, "cus_ann"))
    console.deliver(subscription_created("cus_ann"))
    console.drain()
    response = console.get("/admin/api/users", params={"email": "Ann@Example.com"})
    assert response.status_code == 200
    with console.engine.connect() as connection:
        expected = show_user(connection, ANN, tiers=console.settings.price_tiers)
    assert response.json() == orjson.loads(orjson.dumps(expected, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC))
    assert (response.json()["tier"], response.json()["status"]) == ("pro", "active")
    assert console.get("/admin/api/users", params={"email": "nobody@example.com"}).status_code == 404
    assert console.get("/admin/api/users").status_code == 400


def test_chart_counts_deliveries_and_failures_in_the_current_bucket(console: Console) -> None:
    _failed_subscription(console)
    console.deliver(customer_created("bob@example.com", "cus_bob"))
    chart = console.get("/admin/api/chart").json()
    assert len(chart["buckets"]) == 96
    assert chart["totals"] == {"received": 3, "duplicate": 0, "rejected": 0, "failed": 1}
    assert chart["series"]["received"][-1] == 3  # the newest bucket holds now


def test_health_reports_the_webhook_checks_of_the_health_endpoint(console: Console) -> None:
    _failed_subscription(console)
    health = console.get("/admin/api/health").json()
    assert health["status"] == "degraded"
    parked = next(c for c in health["checks"] if c["name"] == "parked")
    assert parked["status"] == "fail"
    assert parked["parked"] == 1


# -- the page and the session ---------------------------------------------------------------


def test_the_page_inlines_its_script_and_style_allowed_by_hash_and_loads_nothing_from_elsewhere(
    console: Console,
) -> None:
    response = console.get("/admin")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'sha256-" in csp
    assert "unsafe-inline" not in csp
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text)
    assert response.headers["cache-control"] == "no-store"


def test_the_sign_in_form_sets_a_secure_httponly_samesite_strict_session_cookie(console: Console) -> None:
    response = console.client.post("/admin/login", data={"token": ADMIN_TOKEN, "name": "ann"}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/admin"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/admin"} <= attributes
    assert ADMIN_TOKEN not in cookie
    assert console.client.get("/admin/api/health").status_code == 200  # the cookie alone now suffices


def test_a_wrong_token_in_the_sign_in_form_is_refused_with_401_and_no_cookie(console: Console, admin_log) -> None:
    response = console.client.post("/admin/login", data={"token": "not-the-token-000000", "name": "x"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "That token is not right" in response.text
    assert any("admin unauthorized reason=bad_token" in r.getMessage() for r in admin_log.records)


def test_a_cookie_authenticated_change_needs_the_pages_csrf_token(console: Console) -> None:
    failed = _failed_subscription(console)
    csrf = _sign_in(console)
    body = {"event_id": failed["id"], "dry_run": True}
    assert console.client.post("/admin/api/replay", json=body).status_code == 403
    assert console.client.post("/admin/api/replay", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    accepted = console.client.post("/admin/api/replay", json=body, headers={"X-CSRF-Token": csrf})
    assert accepted.status_code == 200


def test_a_replay_from_the_console_is_audited_under_the_signed_in_name(console: Console) -> None:
    failed = _failed_subscription(console)
    csrf = _sign_in(console, name="Ann O'Neil")
    response = console.client.post(
        "/admin/api/replay", json={"event_id": failed["id"], "reason": "retry"}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 200
    entry = console.get("/admin/api/audit").json()["entries"][0]
    assert (entry["actor"], entry["claimed_by"]) == ("console:shared", "Ann ONeil")


def test_signing_out_clears_the_session_cookie(console: Console) -> None:
    csrf = _sign_in(console)
    response = console.client.post("/admin/logout", data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert f'{SESSION_COOKIE}=""' in response.headers["set-cookie"] or "Max-Age=0" in response.headers["set-cookie"]
    assert console.client.get("/admin/api/health").status_code == 401


def test_a_session_cookie_that_was_altered_or_never_issued_is_refused(console: Console) -> None:
    _sign_in(console, name="ann")
    genuine = console.client.cookies[SESSION_COOKIE]
    console.client.cookies.clear()
    flipped = genuine[:-1] + ("A" if genuine[-1] != "A" else "B")
    for forged in (flipped, genuine + "A", "v2." + "A" * 43, "v1.1700000000.YW5u.forged", "garbage"):
        console.client.cookies.set(SESSION_COOKIE, forged, domain="testserver.local", path="/admin")
        assert console.client.get("/admin/api/health").status_code == 401, forged
        console.client.cookies.clear()

"""The on-call runbook, as tests against a real server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from e2e.harness import KamiyoServer, ServerFactory, wait_until
from kamiyo import synthetic
from support import OLD_SECRET, PG_ADMIN_URL, SECRET, signed

pytestmark = pytest.mark.slow

WRONG_SECRET = "whsec_wrong_0000000000000000000000"
NEW_SECRET = "whsec_rolled_in_1111111111111111111"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, module_servers: ServerFactory) -> KamiyoServer:
    return module_servers(request.param)


def _subscription_flow(customer_id: str, email: str) -> tuple[dict, dict]:
    """A new subscription to the pro price, then its first paid invoice (which carries the email)."""
    sub_id = synthetic.new_id("sub")
    sub = synthetic.subscription(sub_id=sub_id, customer_id=customer_id, price_obj=synthetic.price("price_pro_monthly"))
    inv = synthetic.invoice(customer_id=customer_id, sub_id=sub_id, email=email)
    now = int(time.time())
    return (
        synthetic.event("customer.subscription.created", sub, created=now - 1),
        synthetic.event("invoice.payment_succeeded", inv, created=now),
    )


def test_health_answers_200_when_app_and_database_are_up(server: KamiyoServer) -> None:
    response = server.http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "writer": "ok"}


def test_runbook_step3_unsigned_ping_gets_400_missing_signature(server: KamiyoServer) -> None:
    """The runbook's curl: an unsigned '{"type":"ping"}' gets 400 whose body says "missing signature"."""
    response = server.post(b'{"type":"ping"}', {"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "missing signature" in response.text
    assert response.json()["reason"] == "missing_signature"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_non_post_methods_get_405_with_allow_post(server: KamiyoServer, method: str) -> None:
    """The runbook's `curl -I` check: GET and HEAD are 405 Method Not Allowed with `Allow: POST`."""
    response = server.http.request(method, "/api/v1/payments/webhook")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_signed_subscription_and_invoice_give_the_user_the_paid_tier(server: KamiyoServer) -> None:
    """Subscription created + invoice paid (signed as Stripe signs) → users row pro/active."""
    email = f"Paying.{synthetic.new_id('u')}@Example.com"
    for event in _subscription_flow(synthetic.new_id("cus"), email):
        response = server.deliver(event)
        assert response.status_code == 200, response.text
        assert response.json() == {"received": True, "id": event["id"], "duplicate": False}
    server.wait_for_user(email, ("pro", "active"))


def test_subscription_delivered_after_its_invoice_still_lands(server: KamiyoServer) -> None:
    """Arrival order is not trusted: the invoice (with the email) first, then the subscription."""
    email = f"reversed.{synthetic.new_id('u')}@example.com"
    sub_event, invoice_event = _subscription_flow(synthetic.new_id("cus"), email)
    for event in (invoice_event, sub_event):
        assert server.deliver(event).status_code == 200
    server.wait_for_user(email, ("pro", "active"))


def test_unknown_event_type_is_acknowledged_stored_and_marked_ignored(server: KamiyoServer) -> None:
    event = synthetic.event("charge.refunded", {"id": synthetic.new_id("ch"), "object": "charge"})
    response = server.deliver(event)
    assert response.status_code == 200
    assert server.event_status(event["id"]) == "ignored"


def test_runbook_option5_manual_sql_works_verbatim_on_the_live_database(server: KamiyoServer) -> None:
    """Option 5's SELECT and UPDATE (the temporary manual sync) run as written against the users table."""
    email = f"manual.{synthetic.new_id('u')}@example.com"
    event = synthetic.trigger_event("customer.created", email=email, price_obj=synthetic.price())
    assert server.deliver(event).status_code == 200
    server.wait_for_user(email, ("free", None))
    with server.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE users\nSET subscription_tier = 'pro',\n    subscription_status = 'active'\n"
                f"WHERE email = '{email}';"
            )
        )
    select = f"SELECT email, subscription_tier, subscription_status\nFROM users\nWHERE email = '{email}';"
    assert server.rows(select) == [(email, "pro", "active")]


def test_duplicate_delivery_with_fresh_signature_is_acknowledged_and_stored_once(server: KamiyoServer) -> None:
    event = synthetic.trigger_event(
        "payment_intent.succeeded", email=f"dup.{synthetic.new_id('u')}@example.com", price_obj=synthetic.price()
    )
    first = server.deliver(event, timestamp=int(time.time()) - 5)
    again = server.deliver(event)  # a retry: same event id, fresh t and v1
    assert first.request.headers["stripe-signature"] != again.request.headers["stripe-signature"]
    assert (first.status_code, first.json()["duplicate"]) == (200, False)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    assert server.stored_count(event["id"]) == 1
    assert server.wait_for_log("webhook accepted", f"event={event['id']}", "type=payment_intent.succeeded")
    assert server.wait_for_log("webhook duplicate", f"event={event['id']}", "type=payment_intent.succeeded")


def test_wrong_secret_gets_400_and_the_runbook_grep_finds_the_validation_failure(server: KamiyoServer) -> None:
    """Runbook step 1: `grep -i webhook` shows "Webhook validation failed" and "Invalid signature"."""
    event = synthetic.trigger_event("payment_intent.succeeded", email="wrong@example.com", price_obj=synthetic.price())
    before = len(server.log_lines("Webhook validation failed"))
    response = server.deliver(event, WRONG_SECRET)
    assert response.status_code == 400
    assert response.json()["reason"] == "invalid_signature"
    assert server.stored_count(event["id"]) == 0
    server.wait_for_log("Webhook validation failed", count=before + 1)
    lines = [line for line in server.log_lines("Webhook validation failed", "Invalid signature") if "webhook" in line]
    assert len(lines) == before + 1, server.log()[-2000:]


def test_no_secret_ever_appears_in_the_log(server: KamiyoServer) -> None:
    """Accepted, duplicate and rejected deliveries (right and wrong secrets): the log holds no secret."""
    event = synthetic.trigger_event("customer.created", email="nolog@example.com", price_obj=synthetic.price())
    failures_before = len(server.log_lines("Webhook validation failed"))
    assert server.deliver(event).status_code == 200
    assert server.deliver(event).status_code == 200
    assert server.deliver(event, WRONG_SECRET).status_code == 400
    assert server.post(b"{}", {"Stripe-Signature": "t=1,v1=" + "0" * 64}).status_code == 400
    server.wait_for_user("nolog@example.com", ("free", None))
    server.wait_for_log("Webhook validation failed", count=failures_before + 2)  # every line is out
    log = server.log()
    assert "webhook accepted" in log  # the log under test is really this server's log
    for secret in (SECRET, WRONG_SECRET):
        assert secret not in log
        assert secret.removeprefix("whsec_") not in log


def test_secret_rotation_accepts_the_new_and_the_old_secret_until_the_old_is_removed(servers: ServerFactory) -> None:
    """STRIPE_WEBHOOK_SECRET="new,old" accepts either; after the roll completes the old one is refused."""
    server = servers("sqlite", STRIPE_WEBHOOK_SECRET=OLD_SECRET)

    def status(secret: str) -> int:
        event = synthetic.trigger_event("customer.created", email="rot@example.com", price_obj=synthetic.price())
        return server.deliver(event, secret).status_code

    assert (status(OLD_SECRET), status(NEW_SECRET)) == (200, 400)
    server.restart(STRIPE_WEBHOOK_SECRET=f"{NEW_SECRET},{OLD_SECRET}")
    assert (status(OLD_SECRET), status(NEW_SECRET)) == (200, 200)
    # During a roll Stripe sends one v1 per active secret in one header: that passes too.
    event = synthetic.trigger_event("customer.created", email="rot@example.com", price_obj=synthetic.price())
    body, headers = _two_signatures(event, NEW_SECRET, OLD_SECRET)
    assert server.post(body, headers).status_code == 200
    server.restart(STRIPE_WEBHOOK_SECRET=NEW_SECRET)
    assert (status(OLD_SECRET), status(NEW_SECRET)) == (400, 200)


def _two_signatures(event: dict, first: str, second: str) -> tuple[bytes, dict[str, str]]:
    body, headers = signed(event, first)
    _, other = signed(event, second, timestamp=int(headers["Stripe-Signature"].split(",")[0][2:]))
    headers["Stripe-Signature"] += "," + other["Stripe-Signature"].split(",")[1]
    return body, headers


@pytest.mark.postgres
def test_health_is_503_while_the_database_refuses_connections_and_200_after(servers: ServerFactory) -> None:
    """GET /health reports the database: 503 within seconds while PostgreSQL refuses connections (an
    answer is reused for HEALTH_CACHE_SECONDS), 200 once it is back."""
    server = servers("postgres")
    assert server.http.get("/health").status_code == 200
    name = make_url(server.database_url).database
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            response = wait_until(
                lambda: (answer := server.http.get("/health")).status_code == 503 and answer,
                timeout=5,
                what="/health to turn 503",
            )
            assert response.json()["status"] == "unavailable"
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    wait_until(lambda: server.http.get("/health").status_code == 200, timeout=10, what="/health back to 200")

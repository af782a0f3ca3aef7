"""The operator console in a real headless Chromium, against a real ``kamiyo serve``."""

from __future__ import annotations

from typing import Any

import pytest

from admin.app_client import ADMIN_TOKEN
from admin.events import UNMAPPED_PRICE, customer_created, subscription_created
from e2e.harness import KamiyoServer, ServerFactory, wait_until
from kamiyo.domain.outcomes import CustomerOutcome, LinkResult, Outcome, SubscriptionOutcome, UserChange
from support import PRICE_TIERS, record_outcome

pytestmark = pytest.mark.slow

ANN = "ann@example.com"


def _sign_in(page: Any, server: KamiyoServer, name: str = "ann") -> None:
    page.goto(server.url + "/admin")
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.fill("input[name=name]", name)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("body[data-loaded=overview]")


def _open_deliveries(page: Any, server: KamiyoServer, query: str = "") -> None:
    page.goto(f"{server.url}/admin#/deliveries{query}")
    page.wait_for_selector("body[data-loaded=deliveries]")


def _failed_delivery(server: KamiyoServer, email: str = ANN, customer_id: str = "cus_ann") -> str:
    """A linked customer whose subscription names a price no tier is configured for: parked as failed."""
    server.deliver(customer_created(email, customer_id)).raise_for_status()
    event = subscription_created(customer_id, UNMAPPED_PRICE)
    server.deliver(event).raise_for_status()
    wait_until(lambda: server.event_status(event["id"]) == "failed", what="the event to be parked")
    return str(event["id"])


@pytest.fixture
def server(console_server: KamiyoServer) -> KamiyoServer:
    return console_server


def test_the_console_without_a_session_is_refused_with_401_and_offers_the_sign_in_form(
    page: Any, server: KamiyoServer
) -> None:
    response = page.goto(server.url + "/admin")
    assert response.status == 401
    assert page.is_visible("#signin input[name=token]")
    assert page.locator("nav").count() == 0
    api = page.goto(server.url + "/admin/api/deliveries")
    assert api.status == 401


def test_a_wrong_token_in_the_sign_in_form_is_refused_and_says_so(page: Any, server: KamiyoServer) -> None:
    page.goto(server.url + "/admin")
    page.fill("input[name=token]", "not-the-admin-token-000")
    with page.expect_navigation() as navigation:
        page.click("#signin button[type=submit]")
    assert navigation.value.status == 401
    assert "That token is not right" in page.inner_text(".error")
    assert page.context.cookies() == []


def test_signing_in_keeps_the_session_in_a_secure_httponly_strict_cookie_and_shows_the_overview(
    page: Any, server: KamiyoServer
) -> None:
    _sign_in(page, server, name="ann")
    [cookie] = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (
        "kamiyo_admin",
        True,
        True,
        "Strict",
    )
    assert ADMIN_TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: out of reach of scripts
    assert page.inner_text(".signout b") == "shared (as ann)"  # the shared token proves no name: ann is a claim
    assert page.locator("#chart svg").count() == 1
    assert page.inner_text("#health-status") in ("healthy", "degraded")
    assert page.locator("#health-checks tr[data-check=worker]").count() == 1


def test_a_failed_delivery_is_listed_and_replaying_it_after_a_restart_with_the_price_mapped_turns_it_green(
    page: Any, servers: ServerFactory
) -> None:
    server = servers()
    event_id = _failed_delivery(server)
    _sign_in(page, server)
    _open_deliveries(page, server)
    row = page.locator(f"tr[data-event-id='{event_id}']")
    assert row.get_attribute("data-mark") == "failed"
    assert UNMAPPED_PRICE in row.inner_text()

    # The overview groups it under its reason.
    page.click("nav a[data-view=overview]")
    page.wait_for_selector("#parked td")
    assert "UnmappedPrice" in page.inner_text("#parked")

    # Configuration is read at start: map the price, restart, then replay from the console.
    server.restart(STRIPE_PRICE_TIERS=PRICE_TIERS + f",{UNMAPPED_PRICE}=enterprise")
    _open_deliveries(page, server, "?status=failed")
    page.click(f"tr[data-event-id='{event_id}']")
    page.wait_for_selector(f"#delivery-id:text('{event_id}')")
    assert page.get_attribute("#delivery-mark", "data-mark") == "failed"
    assert UNMAPPED_PRICE in page.inner_text("#delivery-error")
    page.fill("#replay input[name=reason]", "mapped the team price")
    page.click("#replay-button")
    page.wait_for_selector("#delivery-mark[data-mark=applied]")

    color = page.eval_on_selector("#delivery-mark", "el => getComputedStyle(el).color")
    assert color == "rgb(26, 127, 55)"  # the applied green
    assert page.is_hidden("#delivery-error")
    assert server.event_status(event_id) == "applied"
    assert server.user(ANN) == ("enterprise", "active")
    _open_deliveries(page, server)
    assert page.get_attribute(f"tr[data-event-id='{event_id}']", "data-mark") == "applied"

    page.goto(server.url + "/admin#/audit")
    page.wait_for_selector("body[data-loaded=audit]")
    assert "console:shared\tann" in page.inner_text("#audit")  # the actor, then the claim
    assert "mapped the team price" in page.inner_text("#audit")


def test_the_deliveries_filter_by_customer_shows_only_that_customers_events(page: Any, server: KamiyoServer) -> None:
    _failed_delivery(server, "bob@example.com", "cus_bob")
    _failed_delivery(server, "cy@example.com", "cus_cy")
    _sign_in(page, server)
    _open_deliveries(page, server)
    page.fill("#filters input[name=customer]", "bob@example.com")
    page.click("#filters button[type=submit]")
    # The list drawn for the filter, not the unfiltered one still on the page.
    page.wait_for_selector("body[data-loaded-hash*='customer=']")
    page.wait_for_selector("#deliveries tbody tr.event")
    customers = page.locator("#deliveries tbody tr.event td:nth-child(5)").all_inner_texts()
    assert customers
    assert set(customers) == {"cus_bob"}


def test_the_user_search_shows_the_users_tier_subscriptions_and_recent_events(page: Any, server: KamiyoServer) -> None:
    server.deliver(customer_created("dee@example.com", "cus_dee")).raise_for_status()
    server.deliver(subscription_created("cus_dee")).raise_for_status()
    server.wait_for_user("dee@example.com", ("pro", "active"))
    _sign_in(page, server)
    page.click("nav a[data-view=users]")
    page.fill("#user-search input[name=email]", "dee@example.com")
    page.click("#user-search button[type=submit]")
    page.wait_for_selector("#user-report .report")
    report = page.inner_text("#user-report")
    assert "pro" in report
    assert "cus_dee" in report
    assert "customer.subscription.created" in report


def test_one_delivery_shows_its_recorded_outcome_field_by_field_and_an_older_events_sentence(
    page: Any, server: KamiyoServer
) -> None:
    created = customer_created("fay@example.com", "cus_fay")
    sub = subscription_created("cus_fay")
    server.deliver(created).raise_for_status()
    server.deliver(sub).raise_for_status()
    server.wait_for_user("fay@example.com", ("pro", "active"))
    sub_id = sub["data"]["object"]["id"]
    [(fay,)] = server.rows("SELECT id FROM users WHERE email = 'fay@example.com'")
    outcome = Outcome(
        subscription=SubscriptionOutcome(sub_id, "active", "pro", stored=True),
        customer=CustomerOutcome("cus_fay", LinkResult.ALREADY_LINKED, user_id=fay),
        users=(UserChange(fay, "fay@example.com", "free", "pro", None, "active", "best subscription"),),
    )
    record_outcome(server.engine, sub["id"], outcome, "a sentence the page does not show")
    record_outcome(server.engine, created["id"], None, f"customer cus_fay linked to user {fay} by email")

    _sign_in(page, server)
    page.goto(f"{server.url}/admin#/deliveries/{sub['id']}")
    page.wait_for_selector(f"#delivery-id:text('{sub['id']}')")
    shown = page.inner_text("#delivery-detail")
    assert f"{sub_id}: active, tier pro" in shown
    assert f"cus_fay: already linked to user {fay}" in shown
    assert "fay@example.com: free/none → pro/active (best subscription)" in shown
    assert "a sentence" not in shown

    page.goto(f"{server.url}/admin#/deliveries/{created['id']}")
    page.wait_for_selector(f"#delivery-id:text('{created['id']}')")
    assert page.inner_text("#delivery-detail") == f"Outcome: customer cus_fay linked to user {fay} by email"

    # The user search lists the same change against the event, and the older event by its sentence.
    page.click("nav a[data-view=users]")
    page.fill("#user-search input[name=email]", "fay@example.com")
    page.click("#user-search button[type=submit]")
    page.wait_for_selector("#user-report .report")
    events = page.locator("#user-report tr", has_text="applied")  # the recent events, not the subscriptions
    assert "free/none → pro/active (best subscription)" in events.filter(has_text=sub["id"]).inner_text()
    assert "customer cus_fay linked to user" in events.filter(has_text=created["id"]).inner_text()

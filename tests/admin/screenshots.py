"""Screenshots of the operator console for the README: ``make screenshots`` (or run this file).

Starts a real ``kamiyo serve`` on 127.0.0.1 with the console on, sends it realistic deliveries
(some applied, two with an unmapped price, an ignored type, duplicates, bad signatures), spreads
their arrival times over the last day so the chart has a shape (demo data, written straight
into the database), sets one override, and saves PNGs of the main views in docs/screenshots/.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from sqlalchemy import text  # noqa: E402

from admin.app_client import ADMIN_TOKEN  # noqa: E402
from admin.chromium import launch  # noqa: E402
from admin.events import UNMAPPED_PRICE, customer_created, subscription_created  # noqa: E402
from e2e.harness import KamiyoServer, wait_until  # noqa: E402
from kamiyo import synthetic  # noqa: E402
from kamiyo.operations.overrides import set_override  # noqa: E402
from kamiyo.telemetry.delivery_stats import add_delivery_counts, minute_of  # noqa: E402
from support import signed  # noqa: E402

OUT = TESTS.parent / "docs" / "screenshots"
NAMES = ["ann", "bob", "chen", "dara", "eli", "fay", "gus", "hana", "ivo", "jun", "kai", "lea"]


def _fill(server: KamiyoServer) -> str:
    """Deliveries of every kind; returns the id of one parked failure."""
    rng = random.Random(7)
    for name in NAMES:
        customer = f"cus_{name}{rng.randrange(1000, 9999)}"
        server.deliver(customer_created(f"{name}@example.com", customer)).raise_for_status()
        price = rng.choice(["price_pro_monthly", "price_basic", "price_pro_monthly"])
        sub = subscription_created(customer, price)
        server.deliver(sub).raise_for_status()
        if rng.random() < 0.5:
            server.deliver(sub).raise_for_status()  # Stripe retried: a duplicate
    failed = ""
    for name in ("mo", "nia"):
        customer = f"cus_{name}4242"
        server.deliver(customer_created(f"{name}@example.com", customer)).raise_for_status()
        event = subscription_created(customer, UNMAPPED_PRICE)
        server.deliver(event).raise_for_status()
        failed = str(event["id"])
    refund = synthetic.event("charge.refunded", {"id": "ch_3Qx", "object": "charge", "customer": "cus_mo4242"})
    server.deliver(refund).raise_for_status()
    body, headers = signed(customer_created("x@example.com", "cus_x"), "whsec_rotated_away_0000000000")
    for _ in range(2):
        server.post(body, headers)
    wait_until(lambda: server.event_status(failed) == "failed", what="the unmapped price to be parked")
    return failed


def _spread_over_the_day(server: KamiyoServer) -> None:
    """Demo data: arrival times over the last 24 hours, and per-minute counts to match."""
    rng = random.Random(11)
    now = time.time()
    ids = [row[0] for row in server.rows("SELECT id FROM webhook_events ORDER BY id")]
    with server.engine.begin() as connection:
        for position, event_id in enumerate(ids):
            ago = (len(ids) - 1 - position) * (20 * 3600 / len(ids)) + rng.uniform(0, 60)
            moment = datetime.now(UTC) - timedelta(seconds=ago)
            connection.execute(
                text("UPDATE webhook_events SET received_at = :at WHERE id = :id"), {"at": moment, "id": event_id}
            )
        counts: dict[tuple[int, str, str, str], int] = {}
        for _ in range(14):
            minute = minute_of(now - rng.uniform(0, 86400))
            counts[(minute, "duplicate", "", "customer.subscription.updated")] = rng.randint(1, 3)
        burst = now - 5 * 3600  # a secret rotated in Stripe's Dashboard, not here
        for offset in range(0, 1800, 120):
            counts[(minute_of(burst + offset), "rejected", "invalid_signature", "")] = rng.randint(2, 6)
        add_delivery_counts(connection, counts)


def _shoot(page: Any, name: str, *, full_page: bool = True) -> None:
    page.wait_for_timeout(300)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=full_page)
    print(f"saved {OUT / name}.png")


def main() -> int:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        server = KamiyoServer(
            Path(workdir), f"sqlite:///{workdir}/kamiyo.db", KAMIYO_ADMIN_TOKEN=ADMIN_TOKEN, LOG_LEVEL="WARNING"
        )
        try:
            server.upgrade()
            server.start()
            failed = _fill(server)
            _spread_over_the_day(server)
            set_override(
                server.engine,
                email="bob@example.com",
                tier="pro",
                reason="card declined twice during Stripe incident; ticket 4411",
                expires_at=datetime.now(UTC) + timedelta(hours=24),
                actor="carol",
            )
            with sync_playwright() as playwright:
                browser = launch(playwright)
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(server.url + "/admin")
                page.fill("input[name=name]", "ann")
                _shoot(page, "sign-in")
                page.fill("input[name=token]", ADMIN_TOKEN)
                page.click("#signin button[type=submit]")
                page.wait_for_selector("body[data-loaded=overview]")
                _shoot(page, "overview")
                page.goto(server.url + "/admin#/deliveries")
                page.wait_for_selector("body[data-loaded=deliveries]")
                _shoot(page, "deliveries", full_page=False)
                page.goto(f"{server.url}/admin#/deliveries/{failed}")
                page.wait_for_selector(f"#delivery-id:text('{failed}')")
                page.fill("#replay input[name=reason]", "team price mapped in STRIPE_PRICE_TIERS")
                _shoot(page, "delivery", full_page=False)
                page.goto(server.url + "/admin#/users?email=bob@example.com")
                page.wait_for_selector("#user-report .report")
                _shoot(page, "user")
                browser.close()
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

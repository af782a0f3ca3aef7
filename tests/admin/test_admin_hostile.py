"""The console and admin API under hostile input, in-process, on SQLite and PostgreSQL.

Bodies too large or endless, malformed numbers and times, guessed tokens, stolen or stale
cookies, secrets inside stored errors and ids, payloads nested deep: each answered with the
right 4xx (never a 500), nothing read past its cap, nothing secret shown.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from sqlalchemy import update

from admin.app_client import ADMIN_TOKEN, BEARER, AppClient, Console
from admin.events import UNMAPPED_PRICE, customer_created, deep_event, subscription_created
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import events_table
from kamiyo.logs import configure_logging
from kamiyo.web.admin_auth import SESSION_COOKIE
from kamiyo.web.app import create_app
from kamiyo.web.webhook import WEBHOOK_PATH
from kamiyo.webhooks.signature import signature_header
from support import SECRET, make_settings

pytestmark = pytest.mark.timeout(120)

ANN_TOKEN = "ann-own-admin-token-7c1d9e0f2a4b"
BOB_TOKEN = "bob-own-admin-token-3e8a6c2d1f0b"
SECRETS = ("whsec_LeakedSigningSecret0123456789", "sk_live_51LeakedApiKeyAbCdEf0123456789")
MAX_FAILURES = 3
WINDOW = 60


def _settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "admin_token": ADMIN_TOKEN,
        "admin_tokens": (("ann", ANN_TOKEN), ("bob", BOB_TOKEN)),
        "admin_signin_max_failures": MAX_FAILURES,
        "admin_signin_window_seconds": WINDOW,
    }
    values.update(overrides)
    return make_settings(url, **values)


@pytest.fixture
def console(database_url: str) -> Iterator[Console]:
    """The console on a fresh SQLite file or PostgreSQL database; operators ann and bob have tokens of their own."""
    settings = _settings(database_url)
    engine = make_engine(settings)
    upgrade(engine)
    with AppClient(create_app(settings, engine=engine, run_worker=False)) as client:
        yield Console(client, engine, settings)
    engine.dispose()


def _replica(console: Console, **overrides: Any) -> AppClient:
    """Another ``kamiyo serve`` on the same database (settings as given)."""
    return AppClient(create_app(replace(console.settings, **overrides), engine=console.engine, run_worker=False))


def _use_cookie(client: AppClient, cookie: str) -> None:
    """Send ``cookie`` as the session cookie from now on (as a stolen or kept cookie would be)."""
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, cookie, domain="testserver.local", path="/admin")


def _sign_in(client: AppClient, token: str, name: str = "") -> str:
    """Sign in through the form; return the page's CSRF token."""
    response = client.post("/admin/login", data={"token": token, "name": name}, follow_redirects=False)
    assert response.status_code == 303, response.text
    page = client.get("/admin")
    assert page.status_code == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert match
    return match.group(1)


def _failed_event(console: Console, customer_id: str = "cus_ann") -> dict[str, Any]:
    console.deliver(customer_created("ann@example.com", customer_id))
    event = subscription_created(customer_id, UNMAPPED_PRICE)
    console.deliver(event)
    console.drain()
    return event


# -- A1: bodies streamed with a running cap ---------------------------------------------------


class _EndlessBody:
    """An ASGI receive that sends a body of ``total`` bytes in 64 KiB chunks, counting what was taken."""

    CHUNK = b"x" * 65536

    def __init__(self, total: int) -> None:
        self.total = total
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        if self.taken >= self.total:
            await asyncio.sleep(3600)  # a client that never finishes: only a cap ends the request
        self.taken += len(self.CHUNK)
        return {"type": "http.request", "body": self.CHUNK, "more_body": self.taken < self.total}


def _raw_post(
    console: Console, path: str, headers: dict[str, str], body: _EndlessBody
) -> tuple[int, dict[str, str], bytes]:
    """POST straight to the ASGI app (no client buffering); the status, headers and body it answered."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 443),
        "state": {},
    }

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def call() -> None:
        await asyncio.wait_for(console.client.app(scope, body, send), timeout=30)

    console.client._call(call())
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, answer


def _session_headers(console: Console) -> dict[str, str]:
    _sign_in(console.client, ANN_TOKEN)
    return {"Cookie": f"{SESSION_COOKIE}={console.client.cookies[SESSION_COOKIE]}"}


@pytest.mark.parametrize(
    ("path", "kind", "cap"),
    [
        ("/admin/login", "form", "admin_max_form_bytes"),  # before any credential
        ("/admin/api/replay", "json", "admin_max_json_bytes"),  # behind the bearer token
        ("/admin/logout", "session-form", "admin_max_form_bytes"),  # the CSRF form read
    ],
)
def test_an_endless_admin_body_is_refused_413_once_past_its_cap_without_reading_on(
    console: Console, path: str, kind: str, cap: str
) -> None:
    limit = getattr(console.settings, cap)
    headers = {"Content-Type": "application/json"} if kind == "json" else {}
    if kind == "json":
        headers.update(BEARER)
    else:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if kind == "session-form":
        headers.update(_session_headers(console))
    body = _EndlessBody(total=64 * 1024 * 1024)  # no Content-Length: the stream alone tells the size
    status, answer_headers, answer = _raw_post(console, path, headers, body)
    assert status == 413
    assert answer_headers.get("connection") == "close"
    assert body.taken <= limit + len(_EndlessBody.CHUNK)  # stopped at the first chunk past the cap
    assert f"over {limit} bytes".encode() in answer


def test_a_declared_content_length_over_the_cap_is_refused_before_a_byte_is_read(console: Console) -> None:
    body = _EndlessBody(total=300 * 1024 * 1024)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(300 * 1024 * 1024)}
    status, answer_headers, _ = _raw_post(console, "/admin/login", headers, body)
    assert (status, answer_headers.get("connection"), body.taken) == (413, "close", 0)


def test_a_sign_in_form_with_eleven_fields_is_a_400_not_a_500(console: Console) -> None:
    fields = {f"f{i}": "x" for i in range(10)} | {"token": ADMIN_TOKEN}
    response = console.client.post("/admin/login", data=fields, follow_redirects=False)
    assert response.status_code == 400
    assert "at most 10 fields" in response.text
    assert "set-cookie" not in response.headers


# -- A2-A4: numbers and times with bounds, 400 and never 500 ----------------------------------


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/admin/api/deliveries", {"limit": "²"}),
        ("/admin/api/deliveries", {"limit": "5" * 5000}),
        ("/admin/api/deliveries", {"limit": "501"}),
        ("/admin/api/deliveries", {"limit": "0"}),
        ("/admin/api/deliveries", {"type": "x" * 300}),
        ("/admin/api/deliveries", {"customer": "cus_\x00nul"}),
        ("/admin/api/audit", {"since": "99999999999999"}),
        ("/admin/api/audit", {"since": "99999999999d"}),
        ("/admin/api/audit", {"since": "²"}),
        ("/admin/api/audit", {"limit": "1001"}),
        ("/admin/api/chart", {"hours": "²"}),
        ("/admin/api/parked", {"limit": "201"}),
        ("/admin/api/overrides", {"limit": "-1"}),
        ("/admin/api/users", {"email": "a" * 400}),
        ("/admin/api/deliveries/evt_bad-id", {}),
    ],
)
def test_a_malformed_or_out_of_bounds_query_is_a_400_with_a_message(
    console: Console, path: str, params: dict[str, str]
) -> None:
    response = console.get(path, params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"since": "99999999999999", "dry_run": True},
        {"since": "99999999999d", "dry_run": True},
        {"since": "²", "dry_run": True},
        {"failed": True, "dry_run": True, "limit": 1001},
        {"failed": True, "dry_run": True, "limit": "10"},
        {"failed": True, "dry_run": True, "limit": True},
        {"failed": True, "dry_run": True, "surprise": 1},
        {"event_id": "evt_x", "reason": "x" * 1001},
        {"event_id": "evt_x", "reason": "forged\nadmin replay actor=root"},
        {"type": "customer.subscription.updated\nforged", "dry_run": True},
        {"event_id": "not-an-event-id", "dry_run": True},
    ],
)
def test_a_malformed_replay_body_is_a_400_with_a_message(console: Console, body: dict[str, Any]) -> None:
    response = console.post("/admin/api/replay", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_a_replay_takes_at_most_its_limit_oldest_first_default_100(console: Console) -> None:
    events = [_failed_event(console, f"cus_{i}") for i in range(3)]
    limited = console.post("/admin/api/replay", {"failed": True, "dry_run": True, "limit": 2}).json()
    assert limited["limit"] == 2
    assert [r["event_id"] for r in limited["results"]] == [events[0]["id"], events[1]["id"]]
    assert console.post("/admin/api/replay", {"failed": True, "dry_run": True}).json()["limit"] == 100


def test_every_admin_list_stops_at_its_limit(console: Console) -> None:
    for i in range(3):
        _failed_event(console, f"cus_{i}")
    assert len(console.get("/admin/api/deliveries", params={"limit": "2"}).json()["deliveries"]) == 2
    assert len(console.get("/admin/api/audit", params={"limit": "1"}).json()["entries"]) <= 1
    assert len(console.get("/admin/api/parked", params={"limit": "1"}).json()["reasons"]) == 1


# -- A5: sign-in throttling, shared by every replica -----------------------------------------


def test_wrong_tokens_from_one_address_are_throttled_with_429_and_retry_after_even_for_the_right_token(
    console: Console,
) -> None:
    for _ in range(MAX_FAILURES):
        assert console.client.post("/admin/login", data={"token": "a-wrong-guess-0000000000"}).status_code == 401
    response = console.client.post("/admin/login", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert response.status_code == 429
    assert 0 < int(response.headers["retry-after"]) <= WINDOW
    assert "set-cookie" not in response.headers
    assert console.get("/admin/api/health").status_code == 429  # the bearer route is closed too


def test_wrong_bearer_tokens_count_and_another_replica_on_the_same_database_refuses_too(console: Console) -> None:
    for _ in range(MAX_FAILURES):
        wrong = {"Authorization": "Bearer a-wrong-guess-0000000000"}
        assert console.client.get("/admin/api/health", headers=wrong).status_code == 401
    with _replica(console) as other:
        response = other.get("/admin/api/health", headers=BEARER)
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) > 0
        signing_in = other.post("/admin/login", data={"token": ADMIN_TOKEN}, follow_redirects=False)
        assert signing_in.status_code == 429


def test_a_throttled_address_may_try_again_once_its_window_has_ended(console: Console) -> None:
    from kamiyo.web.admin_throttle import SignInThrottle

    throttle = SignInThrottle(console.engine, max_failures=2, window_seconds=60)
    start = time.time()
    assert [throttle.failed("10.0.0.7", start + i) for i in range(3)] == [1, 2, 3]
    assert throttle.retry_after("10.0.0.7", start + 5) == 55
    assert throttle.retry_after("10.0.0.8", start + 5) is None  # another address is not affected
    assert throttle.retry_after("10.0.0.7", start + 61) is None
    assert throttle.failed("10.0.0.7", start + 61) == 1  # a new window counts from one


# -- A6: sessions live in the database; sign-out ends them --------------------------------------


def test_signing_out_ends_the_session_on_the_server_for_every_replica(console: Console) -> None:
    csrf = _sign_in(console.client, ANN_TOKEN)
    stolen = console.client.cookies[SESSION_COOKIE]
    with _replica(console) as other:
        _use_cookie(other, stolen)
        assert other.get("/admin/api/health").status_code == 200  # the session is shared
        response = console.client.post("/admin/logout", data={"csrf": csrf}, follow_redirects=False)
        assert response.status_code == 303
        assert other.get("/admin/api/health").status_code == 401  # the same cookie, replayed after sign-out
    _use_cookie(console.client, stolen)
    assert console.client.get("/admin/api/health").status_code == 401


def test_the_cookie_holds_a_random_id_and_the_database_only_its_hash(console: Console) -> None:
    _sign_in(console.client, ANN_TOKEN)
    cookie = console.client.cookies[SESSION_COOKIE]
    assert ANN_TOKEN not in cookie
    with console.engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT id_hash, operator, token_check FROM admin_sessions").all()
    assert len(rows) == 1
    assert cookie not in str(rows[0])
    assert ANN_TOKEN not in str(rows[0])
    assert rows[0][1] == "ann"


def test_rotating_an_operators_token_signs_that_operators_sessions_out(console: Console) -> None:
    _sign_in(console.client, ANN_TOKEN)
    cookie = console.client.cookies[SESSION_COOKIE]
    rotated = (("ann", "ann-rotated-admin-token-0000000"), ("bob", BOB_TOKEN))
    with _replica(console, admin_tokens=rotated) as restarted:
        _use_cookie(restarted, cookie)
        assert restarted.get("/admin/api/health").status_code == 401
    with _replica(console) as unchanged:
        _use_cookie(unchanged, cookie)
        assert unchanged.get("/admin/api/health").status_code == 200


# -- A11: only a Bearer header decides -------------------------------------------------------


def test_a_proxys_basic_authorization_does_not_override_a_valid_session_cookie(console: Console) -> None:
    _sign_in(console.client, ANN_TOKEN)
    basic = {"Authorization": "Basic cHJveHk6cGFzc3dvcmQ="}
    assert console.client.get("/admin/api/health", headers=basic).status_code == 200
    wrong_bearer = {"Authorization": "Bearer a-wrong-token-00000000000"}
    assert console.client.get("/admin/api/health", headers=wrong_bearer).status_code == 401
    console.client.cookies.clear()
    assert console.client.get("/admin/api/health", headers=basic).status_code == 401


# -- A7: the audit's who is proven by the token; a stated name is only a claim ------------------


def test_the_audit_names_the_token_that_signed_in_and_keeps_the_typed_name_as_a_claim(console: Console) -> None:
    failed = _failed_event(console)
    csrf = _sign_in(console.client, ANN_TOKEN, name="bob")
    response = console.client.post(
        "/admin/api/replay", json={"event_id": failed["id"], "reason": "retry"}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 200, response.text
    entry = console.get("/admin/api/audit").json()["entries"][0]
    assert (entry["actor"], entry["claimed_by"]) == ("console:ann", "bob")


def test_a_bearer_callers_actor_header_is_recorded_only_as_a_claim(console: Console) -> None:
    failed = _failed_event(console)
    response = console.client.post(
        "/admin/api/replay",
        json={"event_id": failed["id"], "reason": "retry"},
        headers={"Authorization": f"Bearer {BOB_TOKEN}", "X-Kamiyo-Actor": "ann"},
    )
    assert response.status_code == 200, response.text
    entry = console.get("/admin/api/audit").json()["entries"][0]
    assert (entry["actor"], entry["claimed_by"]) == ("api:bob", "ann")
    own = console.client.post(
        "/admin/api/replay",
        json={"event_id": failed["id"], "reason": "again"},
        headers={"Authorization": f"Bearer {BOB_TOKEN}", "X-Kamiyo-Actor": "bob"},
    )
    assert own.status_code == 200
    entry = console.get("/admin/api/audit").json()["entries"][0]
    assert (entry["actor"], entry["claimed_by"]) == ("api:bob", None)  # no claim beyond the proof


# -- A9: every error, detail and id shown is scrubbed -----------------------------------------


def test_secrets_inside_stored_errors_and_event_ids_never_reach_the_console(console: Console) -> None:
    leaky = synthetic.event(
        "customer.created", synthetic.customer(customer_id="cus_leak", email="leak@example.com"), event_id=None
    )
    leaky["id"] = f"evt_{SECRETS[1]}"
    console.deliver(leaky)
    with console.engine.begin() as connection:
        connection.execute(
            update(events_table)
            .where(events_table.c.stripe_event_id == leaky["id"])
            .values(status="failed", last_error=f"Boom: {SECRETS[0]} in {SECRETS[1]}", detail=f"key {SECRETS[1]}")
        )
    views = [
        console.get("/admin/api/parked"),
        console.get("/admin/api/deliveries"),
        console.get("/admin/api/deliveries", params={"status": "failed"}),
        console.get("/admin/api/users", params={"email": "leak@example.com"}),
        console.post("/admin/api/replay", {"failed": True, "dry_run": True}),
    ]
    for response in views:
        assert response.status_code in (200, 404), response.text
        for secret in SECRETS:
            assert secret not in response.text, response.request.url
    parked = views[0].json()
    assert parked["total"] == 1
    assert "[redacted]" in parked["reasons"][0]["example"]


# -- W10: a payload nested deep --------------------------------------------------------------


def test_a_payload_nested_990_deep_is_shown_cut_not_a_500(console: Console) -> None:
    event_id, body = deep_event()
    headers = {"Stripe-Signature": signature_header(body, SECRET, int(time.time())), "Content-Type": "application/json"}
    assert console.client.post(WEBHOOK_PATH, content=body, headers=headers).status_code == 200
    response = console.get(f"/admin/api/deliveries/{event_id}")
    assert response.status_code == 200, response.text
    assert "[nested too deep]" in response.json()["payload"]


# -- A13: what an attacker puts in a path reaches the log escaped ----------------------------------


def test_control_characters_in_a_refused_admin_path_are_escaped_in_the_log_line(console: Console) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO")  # the service's own formatter, which escapes every line
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        response = console.client.get("/admin/x%1b[31mRED%c2%85NEL%e2%80%a8LS")
        assert response.status_code == 401
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    written = stream.getvalue()
    [line] = [line for line in written.splitlines() if "admin unauthorized" in line]
    assert "\\x1b[31mRED\\x85NEL\\u2028LS" in line
    for raw in ("\x1b", "\x85", "\u2028"):
        assert raw not in written


def test_an_answer_is_valid_json_whatever_the_scrubber_replaced(console: Console) -> None:
    failed = _failed_event(console)
    with console.engine.begin() as connection:
        connection.execute(
            update(events_table)
            .where(events_table.c.stripe_event_id == failed["id"])
            .values(last_error='Authorization: "Bearer abc\\"def" \\ whsec_x"y')
        )
    response = console.get("/admin/api/deliveries")
    assert orjson.loads(response.content)["deliveries"]

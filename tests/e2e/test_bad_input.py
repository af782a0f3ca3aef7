"""Bad input at the real endpoint: every refusal is a 400 (or 413) naming its cause, never a 5xx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2e.harness import KamiyoServer, ServerFactory, wait_until
from kamiyo import synthetic
from kamiyo.domain.rules import HANDLED_TYPES
from kamiyo.webhooks.signature import sign, signature_header
from support import SECRET, signed

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
REASONS = {"missing_signature", "malformed", "invalid_signature", "timestamp", "payload", "too_large"}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, module_servers: ServerFactory) -> KamiyoServer:
    return module_servers(request.param)


def _event() -> dict:
    return synthetic.trigger_event("customer.created", email="bad-input@example.com", price_obj=synthetic.price())


def _rejected(server: KamiyoServer, body: bytes, headers: dict, reason: str, status: int = 400) -> dict:
    """POST, and check the answer is ``status`` with a JSON error whose reason is ``reason``."""
    response = server.post(body, headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()
    assert error["reason"] == reason, error
    assert error["error"]
    return error


def _signed_raw(body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    return {"Stripe-Signature": signature_header(body, SECRET, int(time.time()) if timestamp is None else timestamp)}


# -- the signature header ----------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, ""], ids=["absent", "empty"])
def test_missing_signature_is_400_missing_signature(server: KamiyoServer, header: str | None) -> None:
    body = orjson.dumps(_event())
    error = _rejected(server, body, {} if header is None else {"Stripe-Signature": header}, "missing_signature")
    assert "missing signature" in error["error"]


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "t=1700000000",  # no v1
        "v1=" + "a" * 64,  # no t
        "t=yesterday,v1=" + "a" * 64,
        "t=-5,v1=" + "a" * 64,
        "t=1700000000,v1=not-hex",  # the only v1 cannot be a signature
        "t=1700000000,v0=" + "a" * 64,  # only the test scheme, which is ignored
        "t=1700000000;v1=" + "a" * 64,
        "t=" + "9" * 40 + ",v1=" + "a" * 64,
        "t=1," + "x" * 9000,
    ],
)
def test_malformed_signature_header_is_400_malformed(server: KamiyoServer, header: str) -> None:
    _rejected(server, orjson.dumps(_event()), {"Stripe-Signature": header}, "malformed")


def test_signature_that_matches_no_secret_is_400_invalid_signature(server: KamiyoServer) -> None:
    event = _event()
    body, headers = signed(event, "whsec_someone_else_entirely_0000")
    _rejected(server, body, headers, "invalid_signature")
    assert server.stored_count(event["id"]) == 0


def test_signature_over_other_bytes_is_400_invalid_signature(server: KamiyoServer) -> None:
    """The raw bytes are verified: re-serialised JSON (one added space) no longer matches."""
    event = _event()
    body, headers = signed(event)
    _rejected(server, body.replace(b'":', b'": ', 1), headers, "invalid_signature")


@pytest.mark.parametrize("offset", [-301, -3600, 301], ids=["just-too-old", "an-hour-old", "in-the-future"])
def test_genuine_signature_outside_300s_tolerance_is_400_timestamp(server: KamiyoServer, offset: int) -> None:
    event = _event()
    body, headers = signed(event, timestamp=int(time.time()) + offset)
    _rejected(server, body, headers, "timestamp")
    assert server.stored_count(event["id"]) == 0


def test_genuine_signature_within_tolerance_is_accepted(server: KamiyoServer) -> None:
    """The boundary's other side: a signature 290 s old (a slow retry) is still fine."""
    body, headers = signed(_event(), timestamp=int(time.time()) - 290)
    assert server.post(body, headers).status_code == 200


@pytest.mark.parametrize(
    "v1",
    ["é" * 64, "ａ" * 64, "0" * 63 + "é", "💳" * 16],
    ids=["latin1", "fullwidth", "one-accent", "emoji"],
)
def test_non_ascii_v1_is_400_not_500(server: KamiyoServer, v1: str) -> None:
    """Stripe's own library raises TypeError on this (hmac.compare_digest on non-ASCII str)."""
    body = orjson.dumps(_event())
    header = f"t={int(time.time())},v1={v1}".encode()
    _rejected(server, body, {"Stripe-Signature": header}, "malformed")


def test_non_ascii_v1_beside_a_genuine_v1_does_not_hide_it(server: KamiyoServer) -> None:
    """Any v1 matching passes; an undecodable neighbour is ignored like any other non-signature."""
    body = orjson.dumps(_event())
    now = int(time.time())
    header = f"t={now},v1={'é' * 64},v1={sign(body, SECRET, now)}".encode()
    assert server.post(body, {"Stripe-Signature": header}).status_code == 200


def test_non_ascii_digits_in_t_are_400_malformed(server: KamiyoServer) -> None:
    body = orjson.dumps(_event())
    header = f"t=١٧٠٠٠٠٠٠٠٠,v1={'a' * 64}".encode()
    _rejected(server, body, {"Stripe-Signature": header}, "malformed")


# -- the body ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b'{"id": "evt_1", "type": ', b"{}\n{}", b"\xef\xbb\xbf{}"],
    ids=["empty", "text", "truncated", "two-documents", "bom"],
)
def test_genuine_signature_over_non_json_is_400_payload(server: KamiyoServer, body: bytes) -> None:
    error = _rejected(server, body, _signed_raw(body), "payload")
    assert "JSON" in error["error"]


@pytest.mark.parametrize(
    "body",
    [b'{"id": "evt_\xff\xfe", "type": "x"}', b"\x80\x81\x82", '{"id": "évt"}'.encode("latin-1")],
    ids=["invalid-bytes-in-string", "binary", "latin-1"],
)
def test_genuine_signature_over_non_utf8_body_is_400_payload(server: KamiyoServer, body: bytes) -> None:
    _rejected(server, body, _signed_raw(body), "payload")


def _without(key: str) -> dict:
    event = _event()
    del event[key]
    return event


@pytest.mark.parametrize(
    "document",
    [
        {"type": "ping"},
        [],
        "evt_1",
        42,
        None,
        _without("id"),
        _without("type"),
        _without("created"),
        _without("data"),
        {**_event(), "id": ""},
        {**_event(), "id": "evt_" + "x" * 300},
        {**_event(), "id": 12345},
        {**_event(), "type": ["customer.created"]},
        {**_event(), "created": "2026-01-01"},
        {**_event(), "created": -1},
        {**_event(), "created": True},
        {**_event(), "data": {"object": "cus_1"}},
        {**_event(), "data": {}},
        {**_event(), "id": "evt_\x00"},
        {**_event(), "type": "customer.created\x00"},
        {**_event(), "created": 2**63},
        {**_event(), "created": 2**64 - 1},
    ],
    ids=lambda d: "x",
)
def test_genuine_signature_over_json_that_is_not_a_stripe_event_is_400_payload(
    server: KamiyoServer, document: object
) -> None:
    body = orjson.dumps(document)
    error = _rejected(server, body, _signed_raw(body), "payload")
    assert "not a JSON Stripe event" in error["error"]


@pytest.mark.parametrize(
    "event_id",
    ["evt_a/b/../c", "evt_../../admin", "evt_a%2Fb", "evt_a-b", "evt_a.b", "evt_a b", "evt_é", "evt_", "ch_1Nir"],
)
def test_a_signed_event_whose_id_is_unlike_stripes_is_400_payload_and_never_stored(
    server: KamiyoServer, event_id: str
) -> None:
    """Such an id could be stored but never opened again by id (``kamiyo events show``, the console)."""
    body = orjson.dumps({**_event(), "id": event_id})
    error = _rejected(server, body, _signed_raw(body), "payload")
    assert "invalid id" in error["error"]
    assert server.stored_count(event_id) == 0


def test_unstorable_optional_envelope_fields_do_not_cost_the_delivery(server: KamiyoServer) -> None:
    """NUL in api_version or in data.object.id (no database column can hold it): still 200, stored."""
    event = _event()
    event["api_version"] = "2026-10-28\x00"
    event["data"]["object"]["id"] = "cus_\x00"
    assert server.deliver(event).status_code == 200
    assert server.stored_count(event["id"]) == 1


def test_the_runbook_ping_signed_with_the_real_secret_is_still_400_payload(server: KamiyoServer) -> None:
    body = b'{"type":"ping"}'
    _rejected(server, body, _signed_raw(body), "payload")


# -- size --------------------------------------------------------------------------------------


def _padded_event(size: int) -> bytes:
    """A genuine event whose JSON is exactly ``size`` bytes."""
    event = _event()
    event["data"]["object"]["metadata"] = {"padding": ""}
    bare = len(orjson.dumps(event))
    event["data"]["object"]["metadata"]["padding"] = "p" * (size - bare)
    body = orjson.dumps(event)
    assert len(body) == size
    return body


def test_body_of_exactly_1_mib_is_accepted(server: KamiyoServer) -> None:
    body = _padded_event(MIB)
    assert server.post(body, _signed_raw(body)).status_code == 200


def test_body_over_1_mib_is_413(server: KamiyoServer) -> None:
    body = _padded_event(MIB + 1)
    _rejected(server, body, _signed_raw(body), "too_large", status=413)


def test_body_over_1_mib_without_content_length_is_413(server: KamiyoServer) -> None:
    """A chunked body declares no size: the limit is enforced while reading, too."""
    body = _padded_event(2 * MIB)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = server.http.post("/api/v1/payments/webhook", content=chunks(), headers=_signed_raw(body))
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["reason"] == "too_large"


@pytest.mark.slow
def test_webhook_max_body_bytes_sets_the_limit(servers: ServerFactory) -> None:
    """WEBHOOK_MAX_BODY_BYTES=4096: 4096 bytes pass, 4097 get 413 (the default would take both)."""
    small = servers("sqlite", WEBHOOK_MAX_BODY_BYTES="4096")
    at_limit, over = _padded_event(4096), _padded_event(4097)
    assert small.post(at_limit, _signed_raw(at_limit)).status_code == 200
    _rejected(small, over, _signed_raw(over), "too_large", status=413)


# -- fuzzing -----------------------------------------------------------------------------------

# Header values h11 can put on the wire: no control characters, no surrounding whitespace.
_header_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=300)
_part = st.one_of(
    st.tuples(st.sampled_from(["t", "v1", "v0", "T", " v1", "v1 ", ""]), st.sampled_from(["="]), _header_text),
    st.tuples(st.just("v1"), st.just("="), st.text("0123456789abcdefABCDEF", min_size=60, max_size=68)),
    st.tuples(st.just("t"), st.just("="), st.integers(-(10**15), 10**15).map(str)),
).map("".join)
_structured_header = st.lists(_part, min_size=0, max_size=6).map(",".join)


@FUZZ
@given(header=st.one_of(_header_text, _structured_header).map(lambda s: s.strip(" ")))
def test_fuzzed_signature_header_never_yields_5xx(server: KamiyoServer, header: str) -> None:
    """Any Stripe-Signature value (non-ASCII included) is refused with a 400 naming a known reason."""
    body = orjson.dumps(_event())
    response = server.post(body, {"Stripe-Signature": header.encode("utf-8")})
    assert response.status_code == 400, (header, response.text)
    assert response.json()["reason"] in REASONS


@FUZZ
@given(body=st.binary(max_size=4096))
def test_fuzzed_signed_bytes_never_yield_5xx(server: KamiyoServer, body: bytes) -> None:
    response = server.post(body, _signed_raw(body))
    assert response.status_code == 400, (body, response.text)
    assert response.json()["reason"] == "payload"


def _json_values(integers: st.SearchStrategy[int]) -> st.SearchStrategy[object]:
    return st.recursive(
        st.none() | st.booleans() | integers | st.floats(allow_nan=False) | st.text(max_size=40),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )


_json = _json_values(st.integers(-(2**70), 2**70))  # beyond what orjson (and Stripe) read
_json64 = _json_values(st.integers(-(2**63), 2**63 - 1))
_event_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=260) | _json,
        "object": st.just("event"),
        "type": st.sampled_from(["customer.created", "invoice.paid", "customer.subscription.updated"])
        | st.text(max_size=260)
        | _json,
        "created": st.integers(-(2**70), 2**70) | _json,
        "api_version": st.text(max_size=80) | _json,
        "livemode": _json,
        "data": st.fixed_dictionaries({}, optional={"object": st.dictionaries(st.text(max_size=10), _json) | _json}),
    },
)


@FUZZ
@given(document=st.one_of(_json, _event_like))
def test_fuzzed_signed_json_is_acknowledged_or_refused_never_5xx(server: KamiyoServer, document: object) -> None:
    """Signed JSON of any shape: 200 (stored) or 400 payload; never a 5xx, never a lost connection."""
    body = json.dumps(document, ensure_ascii=False).encode()  # stdlib: integers of any size
    response = server.post(body, _signed_raw(body))
    assert response.status_code in (200, 400), (document, response.text)
    if response.status_code == 400:
        assert response.json()["reason"] == "payload"


# Objects a handler reads, with any values: the worker must survive whatever a signed event holds.
_garbage_object = st.fixed_dictionaries(
    {},
    optional={
        key: _json64 | st.text(max_size=30)
        for key in (
            "id",
            "object",
            "customer",
            "email",
            "customer_email",
            "receipt_email",
            "customer_details",
            "client_reference_id",
            "status",
            "items",
            "subscription",
            "parent",
            "created",
            "cancel_at_period_end",
            "cancel_at",
            "trial_end",
            "deleted",
        )
    },
)


@settings(max_examples=100, deadline=None)
@given(event_type=st.sampled_from(sorted(HANDLED_TYPES)), obj=_garbage_object)
def test_handled_event_with_garbage_object_is_stored(server: KamiyoServer, event_type: str, obj: dict) -> None:
    """A genuine envelope is acknowledged whatever its object holds: judging the object is the worker's job."""
    event = synthetic.event(event_type, obj)
    response = server.deliver(event)
    assert response.status_code == 200, response.text


def test_worker_drains_garbage_to_a_final_status_and_keeps_applying(server: KamiyoServer) -> None:
    """After every malformed-but-signed event above, nothing stays pending and a genuine flow still lands."""
    customer, email = synthetic.new_id("cus"), f"after-garbage.{synthetic.new_id('u')}@example.com"
    poison = [
        synthetic.event("customer.created", {"id": customer + "x", "email": "nul\x00@example.com"}),
        synthetic.event("customer.subscription.updated", {"id": "sub_x", "customer": customer, "items": 7}),
        synthetic.event("invoice.paid", {"id": "in_x", "customer": ["cus"], "customer_email": {"a": 1}}),
    ]
    for event in poison:
        assert server.deliver(event).status_code == 200
    sub_id = synthetic.new_id("sub")
    sub = synthetic.subscription(sub_id=sub_id, customer_id=customer, price_obj=synthetic.price("price_basic"))
    for event in (
        synthetic.event("customer.subscription.created", sub),
        synthetic.event(
            "invoice.payment_succeeded", synthetic.invoice(customer_id=customer, sub_id=sub_id, email=email)
        ),
    ):
        assert server.deliver(event).status_code == 200
    server.wait_for_user(email, ("basic", "active"))
    wait_until(
        lambda: server.rows("SELECT count(*) FROM webhook_events WHERE status = 'pending'")[0][0] == 0,
        what="every stored event to reach applied, ignored or failed",
    )
    assert {server.event_status(e["id"]) for e in poison} <= {"applied", "failed"}
    assert server.http.get("/health").status_code == 200

"""Stripe-Signature verification: the scheme, every rejection reason, and agreement with stripe-python."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import orjson
import pytest
import stripe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kamiyo import synthetic
from kamiyo.errors import SignatureError
from kamiyo.webhooks.signature import is_probe, probe_header, sign, signature_header, verify_signature

SECRET = "whsec_test_primary_0123456789abcdef"
OLD_SECRET = "whsec_test_rolled_fedcba9876543210"
WRONG_SECRET = "whsec_test_someone_else_000000000"
TOLERANCE = 300
NOW = 1_760_000_000
BODY = orjson.dumps(
    synthetic.event(
        "customer.created",
        synthetic.customer(customer_id="cus_test1", email="ada@example.com", created=NOW),
        created=NOW,
        event_id="evt_test_signature",
    )
)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def verify(header: str | None, body: bytes = BODY, secrets: tuple[str, ...] = (SECRET,), now: float = NOW) -> int:
    return verify_signature(header, body, secrets, tolerance=TOLERANCE, now=now)


def reject(header: str | None, body: bytes = BODY, secrets: tuple[str, ...] = (SECRET,), now: float = NOW) -> str:
    """Verify, expecting a rejection; return its reason."""
    with pytest.raises(SignatureError) as caught:
        verify(header, body, secrets, now)
    return caught.value.reason


def hex_hmac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


# -- the scheme --------------------------------------------------------------------------------


def test_sign_is_hmac_sha256_of_timestamp_dot_body_keyed_by_the_secret() -> None:
    assert sign(BODY, SECRET, NOW) == hex_hmac(SECRET, f"{NOW}.".encode() + BODY)


def test_signature_header_has_the_t_and_v1_stripe_sends() -> None:
    assert signature_header(BODY, SECRET, NOW) == f"t={NOW},v1={sign(BODY, SECRET, NOW)}"


def test_a_valid_signature_returns_the_signed_timestamp() -> None:
    assert verify(signature_header(BODY, SECRET, NOW)) == NOW


def test_any_matching_v1_among_several_passes_wherever_it_sits() -> None:
    good = sign(BODY, SECRET, NOW)
    other = sign(BODY, WRONG_SECRET, NOW)
    assert verify(f"t={NOW},v1={other},v1={good}") == NOW
    assert verify(f"t={NOW},v1={good},v1={other}") == NOW


def test_a_secret_later_in_the_list_matches_during_rotation() -> None:
    header = signature_header(BODY, OLD_SECRET, NOW)
    assert verify(header, secrets=(SECRET, OLD_SECRET)) == NOW


def test_a_header_with_one_v1_per_active_secret_passes_with_either_secret_configured() -> None:
    header = f"t={NOW},v1={sign(BODY, SECRET, NOW)},v1={sign(BODY, OLD_SECRET, NOW)}"
    assert verify(header, secrets=(SECRET,)) == NOW
    assert verify(header, secrets=(OLD_SECRET,)) == NOW


def test_a_correct_hmac_under_v0_or_an_unknown_scheme_is_not_accepted() -> None:
    good = sign(BODY, SECRET, NOW)
    assert reject(f"t={NOW},v0={good}") == "malformed"
    assert reject(f"t={NOW},v2={good},s1={good}") == "malformed"


def test_v0_and_unknown_schemes_are_ignored_next_to_a_valid_v1() -> None:
    fake = "0" * 64
    assert verify(f"t={NOW},v0={fake},v1={sign(BODY, SECRET, NOW)},x9=whatever") == NOW


def test_whitespace_around_header_parts_is_tolerated() -> None:
    assert verify(f" t={NOW} , v1={sign(BODY, SECRET, NOW)} ") == NOW


def test_the_raw_bytes_are_verified_so_any_reserialisation_fails() -> None:
    header = signature_header(BODY, SECRET, NOW)
    pretty = orjson.dumps(orjson.loads(BODY), option=orjson.OPT_INDENT_2)
    assert reject(header, body=pretty) == "invalid_signature"
    assert reject(header, body=BODY + b"\n") == "invalid_signature"


def test_a_tampered_body_is_an_invalid_signature() -> None:
    header = signature_header(BODY, SECRET, NOW)
    assert reject(header, body=BODY.replace(b"ada@example.com", b"eve@example.com")) == "invalid_signature"


# -- rejections --------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "   "])
def test_a_missing_or_empty_header_is_rejected_as_missing_signature(header: str | None) -> None:
    with pytest.raises(SignatureError, match="missing signature") as caught:
        verify(header)
    assert caught.value.reason == "missing_signature"
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("garbage", id="no-equals"),
        pytest.param(f"t={NOW},v1", id="part-without-equals"),
        pytest.param(f"v1={'a' * 64}", id="no-t"),
        pytest.param(f"t=abc,v1={'a' * 64}", id="t-not-digits"),
        pytest.param(f"t=-5,v1={'a' * 64}", id="t-negative"),
        pytest.param(f"t=,v1={'a' * 64}", id="t-empty"),
        pytest.param(f"t=١٧٦٠٠٠٠٠٠٠,v1={'a' * 64}", id="t-non-ascii-digits"),
        pytest.param(f"t={'9' * 13},v1={'a' * 64}", id="t-absurdly-large"),
        pytest.param(f"t={NOW}", id="no-v1"),
        pytest.param(f"t={NOW},v1=", id="v1-empty"),
        pytest.param(f"t={NOW},v1=abc123", id="v1-not-64-hex"),
        pytest.param(f"t={NOW},v1={'A' * 64}", id="v1-uppercase"),
        pytest.param(f"t={NOW},v1={'a' * 64}," + "x=y," * 3000, id="too-long"),
    ],
)
def test_a_malformed_header_is_rejected_as_malformed(header: str) -> None:
    with pytest.raises(SignatureError, match="malformed") as caught:
        verify(header)
    assert caught.value.reason == "malformed"


def test_a_signature_made_with_another_secret_is_rejected_as_invalid_signature() -> None:
    with pytest.raises(SignatureError, match="Invalid signature") as caught:
        verify(signature_header(BODY, WRONG_SECRET, NOW))
    assert caught.value.reason == "invalid_signature"


def test_with_no_secret_configured_nothing_verifies() -> None:
    assert reject(signature_header(BODY, SECRET, NOW), secrets=()) == "invalid_signature"


def test_a_secret_with_a_pasted_trailing_newline_does_not_verify() -> None:
    assert reject(signature_header(BODY, SECRET, NOW), secrets=(SECRET + "\n",)) == "invalid_signature"


def test_a_signature_older_than_the_tolerance_is_rejected_as_timestamp() -> None:
    signed_at = NOW - TOLERANCE - 1
    with pytest.raises(SignatureError, match="tolerance") as caught:
        verify(signature_header(BODY, SECRET, signed_at))
    assert caught.value.reason == "timestamp"


def test_a_signature_newer_than_the_tolerance_is_rejected_as_timestamp() -> None:
    assert reject(signature_header(BODY, SECRET, NOW + TOLERANCE + 1)) == "timestamp"


@pytest.mark.parametrize(
    ("offset", "said"),
    [(-1000, "signed 1000 s ago"), (1000, "signed 1000 s in the future"), (-(TOLERANCE + 1), "signed 301 s ago")],
)
def test_the_timestamp_message_says_how_old_or_how_far_in_the_future_the_signature_is(offset: int, said: str) -> None:
    with pytest.raises(SignatureError) as caught:
        verify(signature_header(BODY, SECRET, NOW + offset))
    assert caught.value.reason == "timestamp"
    assert said in str(caught.value)
    assert "signed -" not in str(caught.value)  # never a negative age


@pytest.mark.parametrize("offset", [-TOLERANCE, TOLERANCE])
def test_a_signature_exactly_at_the_tolerance_still_passes(offset: int) -> None:
    assert verify(signature_header(BODY, SECRET, NOW + offset)) == NOW + offset


def test_a_stale_header_with_a_wrong_signature_is_invalid_signature_not_timestamp() -> None:
    assert reject(signature_header(BODY, WRONG_SECRET, NOW - 10 * TOLERANCE)) == "invalid_signature"


# -- hostile input never escapes as anything but SignatureError --------------------------------


def test_a_non_ascii_v1_is_a_signature_error_not_a_type_error() -> None:
    assert reject(f"t={NOW},v1={'é' * 64}") == "malformed"
    assert reject(f"t={NOW},v1={'０' * 64}") == "malformed"  # fullwidth digits


def test_a_non_ascii_v1_next_to_a_valid_one_does_not_spoil_it() -> None:
    assert verify(f"t={NOW},v1={'é' * 64},v1={sign(BODY, SECRET, NOW)}") == NOW


def test_a_non_utf8_body_is_verified_as_raw_bytes() -> None:
    body = b'{"id": "\xff\xfe"}'
    assert verify(signature_header(body, SECRET, NOW), body=body) == NOW
    assert reject(signature_header(body, WRONG_SECRET, NOW), body=body) == "invalid_signature"


@FUZZ
@given(header=st.text(max_size=300), body=st.binary(max_size=300))
def test_an_arbitrary_header_only_ever_raises_signature_error(header: str, body: bytes) -> None:
    with pytest.raises(SignatureError):
        verify(header, body=body, secrets=(SECRET, OLD_SECRET))


_header_part = st.one_of(
    st.tuples(st.sampled_from(["t", "v1", "v0", "T", " v1", ""]), st.text(max_size=70)).map("=".join),
    st.text(max_size=20),
)


@FUZZ
@given(
    parts=st.lists(_header_part, max_size=6),
    body=st.binary(max_size=200),
    now=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70),
)
def test_a_header_made_of_stripe_like_parts_only_ever_raises_signature_error(
    parts: list[str], body: bytes, now: float
) -> None:
    with pytest.raises(SignatureError):
        verify(",".join(parts), body=body, now=now)


@FUZZ
@given(
    timestamp=st.integers(0, 10**12 - 1),
    now=st.integers(0, 10**12 - 1),
    body=st.binary(max_size=200),
    forged=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
def test_a_well_formed_header_either_verifies_or_raises_signature_error_with_a_known_reason(
    timestamp: int, now: int, body: bytes, forged: str
) -> None:
    genuine = signature_header(body, SECRET, timestamp)
    if abs(now - timestamp) <= TOLERANCE:
        assert verify(genuine, body=body, now=now) == timestamp
    else:
        assert reject(genuine, body=body, now=now) == "timestamp"
    assert reject(f"t={timestamp},v1={forged}", body=body, now=now) == "invalid_signature"


# -- agreement with the official library (stripe-python) ---------------------------------------


def _event_body(**extra: Any) -> bytes:
    event = synthetic.event("customer.created", synthetic.customer(customer_id="cus_test2", email="ada@example.com"))
    event["data"]["object"]["metadata"] = extra
    return orjson.dumps(event)


_json_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30)


@settings(max_examples=100, deadline=None)
@given(metadata=st.dictionaries(_json_text, _json_text, max_size=5))
def test_stripe_python_accepts_every_body_kamiyo_signs(metadata: dict[str, str]) -> None:
    body = _event_body(**metadata)
    header = signature_header(body, SECRET, int(time.time()))
    event = stripe.Webhook.construct_event(body, header, SECRET)
    assert event.id == orjson.loads(body)["id"]


@settings(max_examples=100, deadline=None)
@given(metadata=st.dictionaries(_json_text, _json_text, max_size=5))
def test_kamiyo_accepts_every_header_stripe_python_generates(metadata: dict[str, str]) -> None:
    body = _event_body(**metadata)
    now = int(time.time())
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET, timestamp=now)
    assert verify(header, body=body, now=now) == now


def _rejected_cases(now: int) -> dict[str, tuple[bytes, str]]:
    body = _event_body()
    return {
        "wrong-secret": (body, signature_header(body, WRONG_SECRET, now)),
        "stale": (body, signature_header(body, SECRET, now - TOLERANCE - 60)),
        "tampered-body": (body.replace(b"ada@", b"eve@"), signature_header(body, SECRET, now)),
        "only-v0": (body, f"t={now},v0={sign(body, SECRET, now)}"),
        "no-timestamp": (body, f"v1={sign(body, SECRET, now)}"),
        "empty": (body, ""),
    }


@pytest.mark.parametrize("case", list(_rejected_cases(0)))
def test_kamiyo_rejects_what_stripe_python_rejects(case: str) -> None:
    now = int(time.time())
    body, header = _rejected_cases(now)[case]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, header, SECRET)
    with pytest.raises(SignatureError):
        verify(header, body=body, now=now)


# -- doctor's probe mark -----------------------------------------------------------------------


def probe(header: str | None, secrets: tuple[str, ...] = (SECRET,), now: float = NOW) -> bool:
    return is_probe(header, secrets, tolerance=TOLERANCE, now=now)


def test_a_probe_header_made_with_a_configured_secret_marks_a_probe() -> None:
    assert probe(probe_header(SECRET, NOW))
    assert probe(probe_header(OLD_SECRET, NOW), secrets=(SECRET, OLD_SECRET))  # while a secret is rolled
    assert probe(probe_header(SECRET, NOW - TOLERANCE))
    assert probe(probe_header(SECRET, NOW + TOLERANCE))


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="absent"),
        pytest.param("", id="empty"),
        pytest.param("kamiyo-doctor", id="a-name"),
        pytest.param(probe_header(WRONG_SECRET, NOW), id="another-secret"),
        pytest.param(probe_header(SECRET, NOW - TOLERANCE - 1), id="stale"),
        pytest.param(probe_header(SECRET, NOW + TOLERANCE + 1), id="future"),
        pytest.param(probe_header(SECRET, NOW).replace(f"t={NOW}", f"t={NOW + 1}"), id="timestamp-changed"),
        pytest.param(signature_header(b'{"type":"ping"}', SECRET, NOW), id="a-stripe-signature"),
        pytest.param(f"t={NOW},v1=" + "0" * 64, id="zeros"),
        pytest.param(f"t={NOW},v1={'é' * 64}", id="non-ascii"),
        pytest.param(f"t=²,v1={'0' * 64}", id="superscript-timestamp"),
        pytest.param(f"t={'9' * 5000},v1={'0' * 64}", id="huge-timestamp"),
        pytest.param("t=,v1=,=,,", id="empty-parts"),
    ],
)
def test_anything_but_a_fresh_probe_header_made_with_a_configured_secret_is_not_a_probe(header: str | None) -> None:
    assert not probe(header)


def test_no_probe_is_recognised_without_a_secret() -> None:
    assert not probe(probe_header(SECRET, NOW), secrets=())


@FUZZ
@given(header=st.text(max_size=300))
def test_an_arbitrary_probe_header_is_never_an_error(header: str) -> None:
    assert probe(header) in (True, False)

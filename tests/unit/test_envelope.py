"""Reading the indexed fields of a Stripe event from the verified raw body."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kamiyo import synthetic
from kamiyo.errors import PayloadError
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX
from kamiyo.webhooks.envelope import Envelope, is_event_id, read_envelope
from support import in_ci

CREATED = 1_760_000_000


def good_event() -> dict[str, Any]:
    sub = synthetic.subscription(sub_id="sub_test1", customer_id="cus_test1", created=CREATED)
    return synthetic.event("customer.subscription.created", sub, created=CREATED, event_id="evt_test1")


def body_of(event: Any) -> bytes:
    return orjson.dumps(event)


def rejected(body: bytes) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        read_envelope(body)
    assert caught.value.reason == "payload"
    assert caught.value.status_code == 400
    return caught.value


def without(path: str) -> dict[str, Any]:
    event = good_event()
    *parents, last = path.split(".")
    target = event
    for key in parents:
        target = target[key]
    del target[last]
    return event


def with_value(path: str, value: Any) -> dict[str, Any]:
    event = good_event()
    *parents, last = path.split(".")
    target = event
    for key in parents:
        target = target[key]
    target[last] = value
    return event


def test_a_good_event_yields_its_envelope_and_the_parsed_event() -> None:
    event = good_event()
    envelope, parsed = read_envelope(body_of(event))
    assert envelope == Envelope(
        event_id="evt_test1",
        type="customer.subscription.created",
        api_version=synthetic.LATEST_API_VERSION,
        created=CREATED,
        livemode=False,
        object_id="sub_test1",
    )
    assert parsed == event


def test_livemode_is_true_only_for_the_json_boolean_true() -> None:
    assert read_envelope(body_of(with_value("livemode", True)))[0].livemode is True
    assert read_envelope(body_of(with_value("livemode", "true")))[0].livemode is False


def test_an_id_of_exactly_255_characters_is_accepted() -> None:
    event_id = "evt_" + "x" * 251
    assert read_envelope(body_of(with_value("id", event_id)))[0].event_id == event_id


STRIPE_ID = re.compile(r"evt_[A-Za-z0-9_]+")  # the reference: Stripe's shape, with the length apart


@pytest.mark.parametrize(
    "event_id",
    [
        pytest.param("evt_a/b/../c", id="path"),
        pytest.param("evt_1/..", id="dot-dot"),
        pytest.param("evt_a b", id="space"),
        pytest.param("evt_a-b", id="hyphen"),
        pytest.param("evt_a.b", id="dot"),
        pytest.param("evt_a%2Fb", id="percent"),
        pytest.param("evt_a?b=c", id="query"),
        pytest.param("evt_a\nforged", id="newline"),
        pytest.param("evt_\u001b[31m", id="escape"),
        pytest.param("evt_a\u2028b", id="line-separator"),
        pytest.param("evt_\u00e9", id="non-ascii-letter"),
        pytest.param("evt_\uff11", id="fullwidth-digit"),
        pytest.param("evt_", id="prefix-only"),
        pytest.param("EVT_1", id="upper-prefix"),
        pytest.param("ch_1NirD82eZvKYlo2CIvbtLWuY", id="charge-id"),
        pytest.param("1", id="number-text"),
        pytest.param("evt_1\n", id="trailing-newline"),
        pytest.param(" evt_1", id="leading-space"),
    ],
)
def test_an_id_not_shaped_like_stripes_is_a_payload_error(event_id: str) -> None:
    """evt_ then letters, digits and underscores: anything else could not be opened again by id."""
    assert "invalid id" in str(rejected(body_of(with_value("id", event_id))))
    assert not is_event_id(event_id)


@settings(max_examples=300, deadline=None)
@given(event_id=st.text(max_size=300) | st.from_regex(r"evt_[A-Za-z0-9_]{0,260}", fullmatch=True))
def test_an_id_is_accepted_exactly_when_it_is_shaped_like_stripes_and_255_characters_at_most(event_id: str) -> None:
    expected = STRIPE_ID.fullmatch(event_id) is not None and len(event_id) <= 255
    assert is_event_id(event_id) is expected
    try:
        envelope, _ = read_envelope(body_of(with_value("id", event_id)))
    except PayloadError:
        assert not expected
    else:
        assert expected
        assert envelope.event_id == event_id


def test_the_ids_kamiyo_makes_itself_are_valid() -> None:
    """kamiyo trigger's events (synthetic.new_id) and doctor's probe event."""
    assert is_event_id(synthetic.new_id("evt"))
    assert is_event_id(
        synthetic.trigger_event("customer.created", email="a@example.com", price_obj=synthetic.price())["id"]
    )
    assert is_event_id(PROBE_EVENT_PREFIX + "0123456789abcdef")


CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "events"


def test_every_real_event_in_the_shared_corpus_has_an_accepted_id() -> None:
    """116 events recorded from Stripe (read from /work/shared, never copied here)."""
    if not CORPUS.is_dir():
        if in_ci():
            pytest.fail(f"the shared event corpus is missing at {CORPUS}")
        pytest.skip(f"no shared event corpus at {CORPUS}")
    files = sorted(CORPUS.glob("*.json"))
    assert len(files) >= 100
    for path in files:
        envelope, _ = read_envelope(path.read_bytes())
        assert envelope.event_id == json.loads(path.read_bytes())["id"], path.name


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"id": "evt_1",', id="truncated"),
        pytest.param(b"\xef\xbb\xbf{}", id="utf8-bom"),
    ],
)
def test_a_body_that_is_not_json_is_a_payload_error(body: bytes) -> None:
    assert "not a JSON Stripe event" in str(rejected(body))


def test_a_body_that_is_not_utf8_is_a_payload_error() -> None:
    body = body_of(good_event()).replace(b"evt_test1", b"evt_\xff\xfe")
    rejected(body)


@pytest.mark.parametrize("value", [[good_event()], "evt_1", 42, None, True])
def test_json_that_is_not_an_object_is_a_payload_error(value: Any) -> None:
    assert "expected an object" in str(rejected(body_of(value)))


@pytest.mark.parametrize(
    ("event", "names"),
    [
        pytest.param(without("id"), "id", id="missing-id"),
        pytest.param(with_value("id", ""), "id", id="empty-id"),
        pytest.param(with_value("id", 12345), "id", id="numeric-id"),
        pytest.param(with_value("id", "evt_" + "x" * 252), "id", id="id-over-255"),
        pytest.param(with_value("id", "evt_\x00"), "id", id="id-with-nul"),
        pytest.param(without("type"), "type", id="missing-type"),
        pytest.param(with_value("type", None), "type", id="null-type"),
        pytest.param(with_value("type", "t" * 256), "type", id="type-over-255"),
        pytest.param(without("created"), "created", id="missing-created"),
        pytest.param(with_value("created", True), "created", id="bool-created"),
        pytest.param(with_value("created", "1760000000"), "created", id="string-created"),
        pytest.param(with_value("created", 1.5e9), "created", id="float-created"),
        pytest.param(with_value("created", -1), "created", id="negative-created"),
        pytest.param(with_value("created", 2**63), "created", id="created-beyond-int64"),
        pytest.param(without("data"), "data.object", id="missing-data"),
        pytest.param(with_value("data", []), "data.object", id="data-not-object"),
        pytest.param(without("data.object"), "data.object", id="missing-data-object"),
        pytest.param(with_value("data.object", "sub_1"), "data.object", id="data-object-not-object"),
    ],
)
def test_an_event_missing_a_required_field_is_a_payload_error_naming_it(event: dict[str, Any], names: str) -> None:
    assert names in str(rejected(body_of(event)))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("api_version", None),
        ("api_version", 20240620),
        ("api_version", "v" * 65),
        ("api_version", "2024\x0006-20"),
        ("data.object.id", None),
        ("data.object.id", 7),
        ("data.object.id", "sub_" + "x" * 252),
    ],
)
def test_an_unstorable_optional_field_is_indexed_as_none_not_rejected(path: str, value: Any) -> None:
    envelope, _ = read_envelope(body_of(with_value(path, value)))
    field = "api_version" if path == "api_version" else "object_id"
    assert getattr(envelope, field) is None


def test_reading_does_not_depend_on_key_order_or_extra_fields() -> None:
    event = good_event()
    shuffled = dict(reversed(list(copy.deepcopy(event).items())))
    shuffled["some_future_field"] = {"nested": [1, 2, 3]}
    assert read_envelope(body_of(shuffled))[0] == read_envelope(body_of(event))[0]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_either_parse_or_raise_payload_error(body: bytes) -> None:
    try:
        envelope, _ = read_envelope(body)
    except PayloadError:
        return
    assert 0 < len(envelope.event_id) <= 255


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    overrides=st.dictionaries(
        st.sampled_from(["id", "type", "created", "data", "api_version", "livemode"]), _json, max_size=4
    )
)
def test_an_event_with_arbitrary_json_in_its_fields_either_parses_or_raises_payload_error(
    overrides: dict[str, Any],
) -> None:
    event = {**good_event(), **overrides}
    try:
        body = orjson.dumps(event)
    except orjson.JSONEncodeError:  # integers orjson cannot write are not a body Stripe could send
        return
    try:
        envelope, _ = read_envelope(body)
    except PayloadError:
        return
    assert isinstance(envelope.created, int)
    assert 0 <= envelope.created < 2**63

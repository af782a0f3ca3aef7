"""Which customer, email and user reference each kind of event names."""

from __future__ import annotations

from typing import Any

import pytest

from kamiyo import synthetic
from kamiyo.domain.links import LinkHint, invoice_subscription_id, link_hint, normalize_email


@pytest.mark.parametrize("event_type", ["customer.created", "customer.updated"])
def test_a_customer_event_names_its_customer_and_email(event_type: str) -> None:
    obj = synthetic.customer(customer_id="cus_1", email="  Ada.Lovelace@Example.COM ")
    assert link_hint(event_type, obj) == LinkHint(customer_id="cus_1", email="ada.lovelace@example.com")


def test_a_customer_without_email_names_only_the_customer() -> None:
    obj = synthetic.customer(customer_id="cus_1", email=None)
    assert link_hint("customer.updated", obj) == LinkHint(customer_id="cus_1", email=None)


def test_a_subscription_event_names_its_customer_but_no_email() -> None:
    obj = synthetic.subscription(sub_id="sub_1", customer_id="cus_1")
    obj["email"] = "stray@example.com"  # a Subscription has no email field; a stray one is not trusted
    assert link_hint("customer.subscription.created", obj) == LinkHint(customer_id="cus_1", email=None)


def test_a_checkout_session_names_the_customer_details_email_and_the_client_reference() -> None:
    obj = synthetic.checkout_session(
        customer_id="cus_1", sub_id="sub_1", email="Ada@Example.com", client_reference_id="  user-42 "
    )
    assert link_hint("checkout.session.completed", obj) == LinkHint(
        customer_id="cus_1", email="ada@example.com", user_ref="user-42"
    )


def test_a_checkout_session_falls_back_to_customer_email() -> None:
    obj = synthetic.checkout_session(customer_id="cus_1", sub_id="sub_1", email="ignored@example.com")
    obj["customer_details"] = None
    obj["customer_email"] = "Prefilled@Example.com"
    assert link_hint("checkout.session.completed", obj).email == "prefilled@example.com"


@pytest.mark.parametrize("ref", [None, "", "   ", 42])
def test_a_blank_or_absent_client_reference_is_no_user_reference(ref: Any) -> None:
    obj = synthetic.checkout_session(customer_id="cus_1", sub_id="sub_1", email="ada@example.com")
    obj["client_reference_id"] = ref
    assert link_hint("checkout.session.completed", obj).user_ref is None


@pytest.mark.parametrize("api_version", [synthetic.LEGACY_API_VERSION, synthetic.LATEST_API_VERSION])
@pytest.mark.parametrize("event_type", ["invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed"])
def test_an_invoice_names_its_customer_and_customer_email(event_type: str, api_version: str) -> None:
    obj = synthetic.invoice(customer_id="cus_1", sub_id="sub_1", email="ADA@example.com", api_version=api_version)
    assert link_hint(event_type, obj) == LinkHint(customer_id="cus_1", email="ada@example.com")


def test_an_invoice_with_an_expanded_customer_names_its_id() -> None:
    obj = synthetic.invoice(customer_id="cus_1", sub_id="sub_1", email="ada@example.com")
    obj["customer"] = synthetic.customer(customer_id="cus_expanded", email="other@example.com")
    assert link_hint("invoice.paid", obj) == LinkHint(customer_id="cus_expanded", email="ada@example.com")


@pytest.mark.parametrize("event_type", ["payment_intent.succeeded", "payment_intent.payment_failed"])
def test_a_payment_intent_names_its_customer_and_receipt_email(event_type: str) -> None:
    obj = synthetic.payment_intent(customer_id="cus_1", email=" Ada@Example.com")
    assert link_hint(event_type, obj) == LinkHint(customer_id="cus_1", email="ada@example.com")


def test_a_guest_payment_intent_names_no_customer() -> None:
    obj = synthetic.payment_intent(customer_id=None, email="ada@example.com")
    assert link_hint("payment_intent.succeeded", obj) == LinkHint(customer_id=None, email="ada@example.com")


def test_another_kind_of_event_names_only_its_customer() -> None:
    obj = {"id": "ch_1", "object": "charge", "customer": "cus_1", "receipt_email": "ada@example.com"}
    assert link_hint("charge.succeeded", obj) == LinkHint(customer_id="cus_1", email=None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ada@example.com", "ada@example.com"),
        ("  ADA@Example.COM\n", "ada@example.com"),
        ("a@b", "a@b"),
        ("", None),
        ("   ", None),
        ("ada.example.com", None),
        ("ada@@example.com", None),
        ("a@b@c", None),
        ("ada lovelace@example.com", None),
        ("@example.com", None),
        ("ada@", None),
        ("a" * 310 + "@example.com", None),
        (None, None),
        (42, None),
        (["ada@example.com"], None),
    ],
)
def test_normalize_email_trims_lower_cases_and_refuses_what_is_not_an_email(raw: Any, expected: str | None) -> None:
    assert normalize_email(raw) == expected


def test_invoice_subscription_is_read_from_invoice_subscription_before_basil() -> None:
    obj = synthetic.invoice(customer_id="cus_1", sub_id="sub_1", email=None, api_version=synthetic.LEGACY_API_VERSION)
    assert "parent" not in obj
    assert invoice_subscription_id(obj) == "sub_1"


@pytest.mark.parametrize("api_version", [synthetic.BASIL, synthetic.LATEST_API_VERSION])
def test_invoice_subscription_is_read_from_parent_subscription_details_from_basil_on(api_version: str) -> None:
    obj = synthetic.invoice(customer_id="cus_1", sub_id="sub_1", email=None, api_version=api_version)
    assert "subscription" not in obj
    assert invoice_subscription_id(obj) == "sub_1"


def test_an_expanded_invoice_subscription_is_read_as_its_id() -> None:
    obj = synthetic.invoice(customer_id="cus_1", sub_id="sub_1", email=None, api_version=synthetic.LEGACY_API_VERSION)
    obj["subscription"] = synthetic.subscription(sub_id="sub_expanded", customer_id="cus_1")
    assert invoice_subscription_id(obj) == "sub_expanded"


@pytest.mark.parametrize(
    "parent",
    [
        None,
        {"type": "quote_details", "quote_details": {"quote": "qt_1"}, "subscription_details": None},
        {"type": "subscription_details", "subscription_details": None},
        {"type": "subscription_details", "subscription_details": {"subscription": None}},
    ],
)
def test_an_invoice_without_a_subscription_names_none(parent: Any) -> None:
    obj = synthetic.invoice(customer_id="cus_1", sub_id="sub_1", email=None)
    obj["parent"] = parent
    assert invoice_subscription_id(obj) is None

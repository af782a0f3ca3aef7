"""An event's Outcome as data (domain/outcomes.py): it survives JSON, and its sentence is made from it."""

from __future__ import annotations

import json

import pytest

from kamiyo.domain.outcomes import (
    CustomerOutcome,
    InboxStatus,
    InvoiceOutcome,
    LinkResult,
    Outcome,
    SubscriptionOutcome,
    UserChange,
)

ANN = UserChange(7, "ann@example.com", "free", "pro", None, "active", "sub_1 active pro")
OUTCOMES = [
    Outcome(),
    Outcome(subscription=SubscriptionOutcome("sub_1", "active", "pro", stored=False)),
    Outcome(
        subscription=SubscriptionOutcome("sub_1", "active", "pro", stored=True),
        customer=CustomerOutcome("cus_1", LinkResult.ALREADY_LINKED, user_id=7),
        users=(ANN,),
    ),
    Outcome(
        subscription=SubscriptionOutcome("sub_1", "active", "pro", stored=True),
        customer=CustomerOutcome("cus_1", LinkResult.NOT_LINKED),
    ),
    Outcome(
        invoice=InvoiceOutcome("in_1", "paid", "subscription_cycle", 1, "sub_1"),
        customer=CustomerOutcome("cus_1", LinkResult.LINKED, user_id=7, linked_by="email"),
        users=(ANN,),
    ),
    Outcome(note="no customer on the object, nothing to link"),
]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_an_outcome_reads_back_from_its_json_exactly(outcome: Outcome) -> None:
    assert Outcome.from_json(json.loads(json.dumps(outcome.to_json()))) == outcome


@pytest.mark.parametrize(
    ("outcome", "sentence"),
    [
        (OUTCOMES[0], "nothing to apply"),
        (OUTCOMES[1], "sub_1: older than the stored snapshot, left as is"),
        (
            OUTCOMES[2],
            "sub_1: active pro; customer cus_1 already linked; user ann@example.com free/None -> pro/active",
        ),
        (OUTCOMES[3], "sub_1: active pro; customer cus_1 not linked yet, applies once an event names its email"),
        (
            OUTCOMES[4],
            "invoice in_1 status=paid reason=subscription_cycle attempt=1 subscription=sub_1; "
            "customer cus_1 linked to user 7 by email; user ann@example.com free/None -> pro/active",
        ),
        (OUTCOMES[5], "no customer on the object, nothing to link"),
    ],
)
def test_the_sentence_is_made_from_the_data(outcome: Outcome, sentence: str) -> None:
    assert outcome.describe() == sentence


def test_a_stored_snapshot_of_a_linked_user_that_changed_nothing_says_so() -> None:
    outcome = Outcome(
        subscription=SubscriptionOutcome("sub_1", "active", "pro", stored=True),
        customer=CustomerOutcome("cus_1", LinkResult.ALREADY_LINKED, user_id=7),
    )
    assert outcome.describe() == "sub_1: active pro; customer cus_1 already linked; user 7 unchanged"


def test_a_user_a_dry_run_would_create_has_no_id_yet() -> None:
    outcome = Outcome(customer=CustomerOutcome("cus_1", LinkResult.LINKED, user_id=None, linked_by="email"))
    assert outcome.describe() == "customer cus_1 linked to a new user by email"


def test_inbox_statuses_are_the_strings_stored() -> None:
    assert [status.value for status in InboxStatus] == ["pending", "applied", "ignored", "failed"]
    assert InboxStatus("failed") is InboxStatus.FAILED
    assert f"{InboxStatus.APPLIED}" == "applied"

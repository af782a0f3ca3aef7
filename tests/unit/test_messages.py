"""The messages between ``kamiyo serve`` and its inbox process survive the framing, each as itself."""

from __future__ import annotations

import time
import typing
from typing import Any

import pytest

from kamiyo.processing.restarts import WorkerDeath
from kamiyo.telemetry.metrics import ProcessedTally
from kamiyo.webhooks import messages
from kamiyo.webhooks.messages import (
    CountRejection,
    Event,
    Frames,
    Ping,
    Pong,
    Processed,
    Ready,
    Start,
    Stop,
    Stored,
    StoreFailed,
    WorkerDied,
    WorkerStarted,
    WorkerStopped,
    frame,
)
from kamiyo.webhooks.writer_health import WriterActivity
from support import event_delivery, make_settings


def _examples() -> list[Any]:
    """One message of every type, with realistic fields."""
    envelope, body = event_delivery("evt_framed_1")
    tally = ProcessedTally.of([("applied", "customer.updated", int(time.time()) - 3, 0.002)], time.time())
    return [
        Start(make_settings("sqlite:///framed.db"), True, True),
        Event(7, envelope, body, "pending", True, time.time(), None),
        Event(8, envelope, body, "ignored", False, time.time(), "a test-mode event; this service takes live"),
        CountRejection("invalid_signature", "customer.updated"),
        Ping(),
        Stop(),
        Ready(),
        Stored([7, 8], [True, False]),
        StoreFailed([9], "OperationalError storing the event; retry later"),
        Pong(WriterActivity(busy_for=0.5, lock_wait_for=0.25, failure="locked", failure_detail="database is locked")),
        Pong(None),
        WorkerStarted(),
        Processed(tally),
        WorkerDied(WorkerDeath("RuntimeError: the loop broke", time.time(), 1.5)),
        WorkerStopped(),
    ]


def test_every_message_type_has_an_example_here() -> None:
    """A new message type added to the module without a round trip below fails this test."""
    declared = set(typing.get_args(messages.ToInbox)) | set(typing.get_args(messages.ToServer))
    assert {type(message) for message in _examples()} == declared


@pytest.mark.parametrize("message", _examples(), ids=lambda m: type(m).__name__)
def test_each_message_survives_the_framing_as_its_own_type_with_its_fields(message: Any) -> None:
    (received,) = Frames().feed(frame([message]))
    assert len(received) == 1
    assert type(received[0]) is type(message)
    assert received[0]._asdict() == message._asdict()


def test_a_frame_cut_anywhere_is_read_once_whole_and_several_frames_in_one_read_are_read_in_order() -> None:
    """The socket delivers bytes as it pleases: one byte at a time, or many frames at once."""
    sent = [_examples(), [Ping()], _examples()[::-1]]
    stream = b"".join(frame(batch) for batch in sent)

    frames = Frames()
    byte_by_byte: list[list[Any]] = []
    for index in range(len(stream)):
        byte_by_byte += frames.feed(stream[index : index + 1])
    all_at_once = Frames().feed(stream)

    for received in (byte_by_byte, all_at_once):
        assert [[type(m) for m in batch] for batch in received] == [[type(m) for m in batch] for batch in sent]
        assert [[m._asdict() for m in batch] for batch in received] == [[m._asdict() for m in batch] for batch in sent]
    assert frames.feed(b"") == []  # nothing left over

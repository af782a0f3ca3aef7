"""The messages between ``kamiyo serve`` and its inbox process, and how they travel.

``kamiyo serve`` (the server: uvicorn's event loop) starts one child process, the inbox process
(``webhooks/inbox_process.py``), and talks to it over a socketpair. The child runs the inbox
writer, and the in-process worker beside it (``processing/in_process.py``) unless the server runs
without one. Every message is one of the NamedTuples below; each side dispatches on its type.

Server → inbox process: ``Start`` once, then ``Event`` per verified delivery, ``CountRejection``
per rejected one, ``Ping`` twice a second, ``Stop`` at the end.
Inbox process → server: ``Ready`` once, ``Stored`` or ``StoreFailed`` per committed or failed
batch, ``Pong`` per ping; from its worker ``WorkerStarted``, ``Processed`` per committed batch,
``WorkerDied`` per death, ``WorkerStopped`` if its thread ends by itself.

Framing: what one side sends within one turn of its loop goes as one frame, a list of messages
pickled and prefixed with its length (``frame``); ``Frames`` cuts a byte stream back into them.
Pickle, because only the two ends of our own socketpair ever read it. Each message travels as a
plain tuple, its type's number first, and is made again on arrival: the per-delivery message must
cost the event loop as little as possible, and a NamedTuple pickled as itself costs a Python call
per message and its class's look-up per frame (docs/PERFORMANCE.md).

A NamedTuple is still a tuple: two messages of different types with equal fields compare equal.
Dispatch on the type (``match``, ``isinstance``), never on equality.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, cast, get_args

if TYPE_CHECKING:
    from kamiyo.config import Settings
    from kamiyo.processing.restarts import WorkerDeath
    from kamiyo.telemetry.metrics import ProcessedTally
    from kamiyo.webhooks.envelope import Envelope
    from kamiyo.webhooks.writer_health import WriterActivity

_LENGTH = struct.Struct("!I")


# -- the server to the inbox process -------------------------------------------------------------


class Start(NamedTuple):
    """The server, right after starting the child: what it needs to open the database and run."""

    settings: Settings
    count_deliveries: bool  # count deliveries and rejections into the per-minute stats
    run_worker: bool  # run the in-process worker beside the writer


class Event(NamedTuple):
    """The server, for each verified delivery: the inbox row to commit (the child makes the row:
    the envelope and the body pickle faster than the row would). Answered by ``Stored`` or
    ``StoreFailed`` naming ``number``."""

    number: int  # the delivery's number in this server, counting up from 0
    envelope: Envelope
    body: bytes
    status: str  # the inbox status to store it with (pending, or ignored for the other Stripe mode)
    counted: bool  # whether it counts in the per-minute delivery stats (not a doctor's probe)
    received_at: float  # Unix seconds, when the server received it
    detail: str | None  # the stored detail, e.g. why it is ignored


class CountRejection(NamedTuple):
    """The server, for each rejected delivery: one more in the per-minute stats (nobody waits)."""

    reason: str
    event_type: str


class Ping(NamedTuple):
    """The server, every ``writer_health.PING_SECONDS``: answered by ``Pong`` from the child's main thread."""


class Stop(NamedTuple):
    """The server, when it stops: store what was sent, answer it, then exit."""


# -- the inbox process to the server -------------------------------------------------------------


class Ready(NamedTuple):
    """The child, once its writer (and worker, if asked for) has started: it can store now."""


class Stored(NamedTuple):
    """The child's writer, after a batch committed: each delivery's number and whether its event
    was new (False: its id was stored already)."""

    numbers: list[int]
    new: list[bool]


class StoreFailed(NamedTuple):
    """The child's writer, when a batch could not be stored: those deliveries get 503."""

    numbers: list[int]
    error: str  # one line, no SQL, no values


class Pong(NamedTuple):
    """The child, for each ``Ping``: its writer's account of itself (None before ``Start``)."""

    activity: WriterActivity | None


class WorkerStarted(NamedTuple):
    """The child's worker thread, as each worker starts (the first, and after each death)."""


class Processed(NamedTuple):
    """The child's worker, after each batch it committed: the batch's metrics, summed."""

    tally: ProcessedTally


class WorkerDied(NamedTuple):
    """The child's worker thread, when its worker ended by an error: it restarts after a pause."""

    death: WorkerDeath


class WorkerStopped(NamedTuple):
    """The child's worker thread, when it ended without being told to stop: nothing applies events."""


ToInbox = Start | Event | CountRejection | Ping | Stop
ToServer = Ready | Stored | StoreFailed | Pong | WorkerStarted | Processed | WorkerDied | WorkerStopped
Message = ToInbox | ToServer


# Every message type, numbered for the wire by its place here.
_TYPES: tuple[type[Message], ...] = (*get_args(ToInbox), *get_args(ToServer))
_NUMBERS: dict[type[Message], int] = {kind: number for number, kind in enumerate(_TYPES)}


def frame(messages: Sequence[Message]) -> bytes:
    """One frame: the messages as (type's number, *fields) tuples, pickled, prefixed with their length."""
    numbers = _NUMBERS
    data = pickle.dumps([(numbers[type(message)], *message) for message in messages], protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class Frames:
    """Cuts a byte stream back into the lists of messages ``frame`` made."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[Message]]:
        """The frames completed by ``data``, in order; an incomplete one waits for the next bytes."""
        self._buffer += data
        frames: list[list[Message]] = []
        start = 0
        new, types = tuple.__new__, _TYPES
        while len(self._buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer, start)
            end = start + _LENGTH.size + size
            if len(self._buffer) < end:
                break
            # Only ever from the other end of our own socketpair, never from the network.
            items = pickle.loads(memoryview(self._buffer)[start + _LENGTH.size : end])  # noqa: S301
            # tuple.__new__ makes the NamedTuple from its fields as its own constructor would.
            frames.append([cast(Message, new(types[item[0]], item[1:])) for item in items])
            start = end
        del self._buffer[:start]
        return frames

"""What the per-delivery message to the inbox process costs, in one process: the server's side
(make the message, frame it) and the child's (cut the frame, make the messages, dispatch).

    .venv/bin/python bench/messages.py [--repeat 7] [--number 4000]

Three framings of the same deliveries (a realistic envelope and body each), with 1 to 32
deliveries per frame (one frame per turn of the event loop: under load a turn carries a few):
``tuples``, plain tuples tagged with a string (the messages before they were typed);
``namedtuples``, the NamedTuples of webhooks/messages.py pickled as themselves; ``framed``, what
``webhooks.messages.frame`` and ``Frames`` do (each message as a plain tuple, its type's number
first, made again on arrival). Microseconds per delivery, the fastest of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import struct
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kamiyo.webhooks.messages import Event, Frames, frame  # noqa: E402
from support import event_delivery  # noqa: E402

_LENGTH = struct.Struct("!I")
SIZES = (1, 2, 4, 8, 32)


class _Unframed:
    """What ``Frames`` does, without making messages of the items: the child's side before them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        frames = []
        start = 0
        while len(self._buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer, start)
            end = start + _LENGTH.size + size
            if len(self._buffer) < end:
                break
            frames.append(pickle.loads(memoryview(self._buffer)[start + _LENGTH.size : end]))
            start = end
        del self._buffer[:start]
        return frames


def _tuples(envelope: Any, body: bytes, size: int) -> tuple[Callable[[], bytes], Callable[[bytes], int]]:
    def send() -> bytes:
        items = [("event", n, envelope, body, "pending", True, time.time(), None) for n in range(size)]
        data = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        return _LENGTH.pack(len(data)) + data

    frames = _Unframed()

    def receive(data: bytes) -> int:
        handled = 0
        for items in frames.feed(data):
            for item in items:
                if item[0] == "event":
                    _kind, _number, _envelope, _body, _status, _counted, _received, _detail = item
                    handled += 1
        return handled

    return send, receive


def _namedtuples(envelope: Any, body: bytes, size: int) -> tuple[Callable[[], bytes], Callable[[bytes], int]]:
    def send() -> bytes:
        items = [Event(n, envelope, body, "pending", True, time.time(), None) for n in range(size)]
        data = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        return _LENGTH.pack(len(data)) + data

    frames = _Unframed()

    def receive(data: bytes) -> int:
        handled = 0
        for items in frames.feed(data):
            for item in items:
                match item:
                    case Event():
                        _number, _envelope, _body, _status, _counted, _received, _detail = item
                        handled += 1
        return handled

    return send, receive


def _framed(envelope: Any, body: bytes, size: int) -> tuple[Callable[[], bytes], Callable[[bytes], int]]:
    def send() -> bytes:
        return frame([Event(n, envelope, body, "pending", True, time.time(), None) for n in range(size)])

    frames = Frames()

    def receive(data: bytes) -> int:
        handled = 0
        for messages in frames.feed(data):
            for item in messages:
                match item:
                    case Event():
                        _number, _envelope, _body, _status, _counted, _received, _detail = item
                        handled += 1
        return handled

    return send, receive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=4000, help="frames per timed run")
    options = parser.parse_args()
    envelope, body = event_delivery("evt_bench_messages_0001")
    variants = {"tuples": _tuples, "namedtuples": _namedtuples, "framed": _framed}
    print("| deliveries per frame | " + " | ".join(f"{name}: server / child µs" for name in variants) + " |")
    print("|---:|" + "---:|" * len(variants))
    for size in SIZES:
        cells = []
        for make in variants.values():
            send, receive = make(envelope, body, size)
            data = send()
            assert receive(data) == size
            per = options.number * size
            sent = min(timeit.repeat(send, number=options.number, repeat=options.repeat)) / per * 1e6
            read = functools.partial(receive, data)
            got = min(timeit.repeat(read, number=options.number, repeat=options.repeat)) / per * 1e6
            cells.append(f"{sent:.2f} / {got:.2f}")
        print(f"| {size} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

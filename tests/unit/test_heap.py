"""``heap.settle``: the collector's settings of the long-running processes (each case in a fresh
interpreter, so that this test process keeps its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from kamiyo.heap import BATCH_YOUNG_THRESHOLD

_PROBE = """
import gc, json, sys
before = gc.get_threshold()
kept = [[n] for n in range(1000)]  # built at start, alive for the process's life
from kamiyo.heap import settle
settle(batches=sys.argv[1] == "batches")
frozen = gc.get_freeze_count()
settle(batches=sys.argv[1] == "batches")  # a second call: the same settings
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "frozen_again": gc.get_freeze_count(), "tracked": gc.is_tracked(kept[0])}))
"""


def _settled(kind: str) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-c", _PROBE, kind], capture_output=True, text=True, timeout=60, check=True)
    seen: dict[str, Any] = json.loads(run.stdout)
    return seen


@pytest.mark.parametrize("kind", ["batches", "event loop"])
def test_settle_freezes_what_was_built_and_keeps_it_tracked(kind: str) -> None:
    seen = _settled(kind)
    frozen, again = seen["frozen"], seen["frozen_again"]
    assert frozen >= 1000  # what was built before, the list's items among it
    assert again >= frozen
    assert seen["tracked"]  # frozen objects are still tracked: nothing is leaked or untracked


def test_a_process_that_applies_batches_collects_its_youngest_generation_less_often() -> None:
    seen = _settled("batches")
    before = seen["before"]
    assert before[0] == 700  # Python's own default
    assert seen["after"] == [BATCH_YOUNG_THRESHOLD, *before[1:]]  # the older generations keep theirs


def test_the_event_loops_process_keeps_pythons_thresholds() -> None:
    seen = _settled("event loop")
    assert seen["after"] == seen["before"]

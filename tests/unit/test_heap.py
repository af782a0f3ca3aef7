"""``heap.settle``: the collector's settings of the long-running processes (run in a fresh
interpreter, so that this test process keeps its own)."""

from __future__ import annotations

import json
import subprocess
import sys

from kamiyo.heap import YOUNG_THRESHOLD

_PROBE = """
import gc, json
before = gc.get_threshold()
kept = [[n] for n in range(1000)]  # built at start, alive for the process's life
from kamiyo.heap import settle
settle()
frozen = gc.get_freeze_count()
settle()  # a second call: idempotent
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "frozen_again": gc.get_freeze_count(), "tracked": gc.is_tracked(kept[0])}))
"""


def test_settle_freezes_what_was_built_and_collects_the_youngest_generation_less_often() -> None:
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(run.stdout)
    assert seen["before"][0] == 700  # Python's own default, which settle raises
    assert seen["after"] == [YOUNG_THRESHOLD, *seen["before"][1:]]  # the older generations keep theirs
    assert seen["frozen"] >= 1000  # what was built before, the list's items among it
    assert seen["frozen_again"] >= seen["frozen"]
    assert seen["tracked"]  # frozen objects are still tracked: nothing is leaked or untracked

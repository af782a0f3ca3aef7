"""The cyclic garbage collector's settings for kamiyo's long-running processes.

``kamiyo serve`` (as its app starts), its inbox process, ``kamiyo worker`` and ``kamiyo sync``
call ``settle`` once they have started. Nothing here changes what is freed: objects without
cycles are freed by reference counting the moment they are let go, and cycles are still
collected, only at a pace that fits how these processes allocate:

- **What a process keeps for its life** (modules, the schema, compiled statements, the app) is
  moved out of the collector's sight by ``gc.freeze``: a full collection no longer walks it.
- **The youngest generation** is collected after ``YOUNG_THRESHOLD`` net allocations of
  containers instead of Python's 700. A worker's batch keeps thousands of small objects alive
  until it commits (rows, the batch's state, outcomes, log lines); at 700 every batch set off
  several collections that walked them all, found nothing to free, and moved them to the older
  generations, whose collections then walked them again. Freed at the batch's end by reference
  counting, they now rarely reach a collection at all. What a collection costs and saves is
  measured in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Freeze what the process has built so far and collect its youngest objects less often.

    Idempotent: a second call also freezes what was built since the first."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)

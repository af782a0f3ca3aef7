"""The cyclic garbage collector's settings for kamiyo's long-running processes.

Nothing here changes what is freed: objects without cycles are freed by reference counting the
moment they are let go, and cycles are still collected.

- **What a process keeps for its life** (modules, the schema, compiled statements, the app) is
  moved out of the collector's sight by ``gc.freeze`` once it has started (``settle``): a full
  collection no longer walks it. Every long-running process does this: ``kamiyo serve`` as its
  app starts, its inbox process, ``kamiyo worker``, ``kamiyo sync``.
- **A process that works in batches** (``kamiyo worker``; the inbox process, whose worker thread
  applies them beside the writer; sync's reader process, a page at a time) also collects its
  youngest generation after ``BATCH_YOUNG_THRESHOLD`` net allocations of containers instead of
  Python's 700. A batch keeps thousands of small objects alive until it is done (rows, the
  batch's state, outcomes, log lines); at 700 every batch set off several collections that walked
  them all, found nothing to free, and moved them to the older generations, whose collections
  walked them again. Freed at the batch's end by reference counting, they now rarely meet a
  collection at all.
- **The event loop's process keeps Python's threshold.** Each request leaves cyclic garbage
  (coroutines, futures, tasks) that only the collector frees: collected often, it stays small
  and in the CPU's caches; at the batch threshold ingest served fewer requests a second.
  The measurements are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import gc

BATCH_YOUNG_THRESHOLD = 10_000


def settle(*, batches: bool = False) -> None:
    """Freeze what the process has built so far; with ``batches``, collect the youngest
    generation every ``BATCH_YOUNG_THRESHOLD`` net allocations (the older generations keep
    their thresholds). A second call also freezes what was built since the first.

    No collection first: it would walk the whole heap at every start (the test suite starts
    many apps) to free the little that starting leaves behind."""
    gc.freeze()
    if batches:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(BATCH_YOUNG_THRESHOLD, middle, old)

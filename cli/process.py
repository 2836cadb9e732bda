"""The console script's garbage-collection policy, not main()'s: tests and embedders call main() and
keep their interpreter's collector as it was.

A command imports torch, MLflow, Prefect and their dependencies (~700k objects that live until
exit); CPython's full collections traverse every one of them each time the heap grows by a
quarter, which measured 2.7 s of collections in one default run, and 2-4 s more for the final
collection at exit. So the console script pauses the collector while a command imports (imports
create next to no cyclic garbage) and exits without the final traversal.
"""

from __future__ import annotations

import gc

YOUNG_COLLECTION_THRESHOLDS = (5_000, 20, 20)  # CPython's default (700, 10, 10): fewer, larger young passes
_collector_paused = False


def pause_collector() -> None:
    global _collector_paused
    gc.disable()
    _collector_paused = True


def imports_done() -> None:
    """After a long command's heavy imports (`run`, `schedule`; the short ones end with the
    collector paused, as a short script may): move every object alive now to the collector's permanent
    generation (never traversed again; cycles made from here on are still collected) and resume
    collecting, less often. A no-op outside the console script."""
    global _collector_paused
    if _collector_paused:
        gc.freeze()
        gc.set_threshold(*YOUNG_COLLECTION_THRESHOLDS)
        gc.enable()
        _collector_paused = False

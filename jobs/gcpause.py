"""Pausing Python's cyclic garbage collector around a bulk step.

A bulk submit allocates tens of container objects per job and keeps thousands of jobs
alive until it returns, so the collector runs every few dozen jobs and rescans them all:
a third of the time of a submit of cache hits went there. Nothing in such a step makes
reference cycles that must be collected before it ends, so the collector is paused for
its duration (reference counting still frees everything as usual). Re-entrant and
thread-safe: the collector is enabled again when the last pause ends, and only if it was
enabled when the first one began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def paused() -> Iterator[None]:
    """Run the body with the cyclic collector paused."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()

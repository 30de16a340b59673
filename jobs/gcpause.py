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

import ctypes
import gc
import threading
from collections.abc import Callable, Iterator
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


#: Allocations between two collections of the youngest generation in a service (Python's
#: default is 700), and how many of those between collections of the next two.
SERVICE_THRESHOLDS = (50_000, 20, 100)


def tune_for_service() -> None:
    """Set the collector up for a long-running service, once it has started.

    Everything alive at start-up (modules, the Celery app, the embedder) lives as long as
    the process: ``gc.freeze`` moves it out of the collector's scans. A scheduler or worker
    allocates a few container objects per job (thousands per tick or batch) and makes
    almost no reference cycles, so the youngest generation is collected every 50,000
    allocations instead of every 700: the scheduler's CPU in ``bench/pipeline.py`` falls by
    about 12%. Reference counting frees everything else as usual. A worker calls it before
    its pool processes fork, so they inherit it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVICE_THRESHOLDS)


def _libc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (None elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc has it; musl and others do not)
        return libc
    except (OSError, AttributeError):
        return None


_glibc = _libc()
_trim: Callable[[int], int] | None = _glibc.malloc_trim if _glibc is not None else None
#: ``mallopt``'s parameter for the size from which an allocation gets a mapping of its own.
_M_MMAP_THRESHOLD = -3
#: That size for a service: 1 MiB.
MMAP_THRESHOLD = 1 << 20


def map_large_allocations() -> None:
    """Give every allocation of 1 MiB or more a mapping of its own, returned to the
    system when it is freed.

    glibc raises that threshold (from 128 KiB up to 32 MiB) each time a mapped block is
    freed, after which blocks of that size come from the heap instead, where a long-lived
    object allocated after them keeps the heap from shrinking. The scheduler allocates
    and frees blocks of megabytes all the time (a group's vectors, FAISS's search results
    and rebuilds), and its resident memory crept up by a few MB per 100,000 jobs. A fixed
    threshold keeps large blocks out of the heap; a mapping costs a system call, a few a
    tick at most."""
    if _glibc is not None:
        _glibc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Give the memory the process has freed back to the system.

    glibc keeps freed memory for reuse inside its arenas; a service that allocates and
    frees in bursts (FAISS's searches, SQLite's pages, a batch's JSON) then holds its
    peak, and looks as if it grew for hours before it levels off. Measured on the
    scheduler over 540,000 jobs: 185 MB resident with this called between phases, 241 MB
    without. A few milliseconds; a service calls it once a minute."""
    if _trim is not None:
        _trim(0)

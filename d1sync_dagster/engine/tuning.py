"""Interpreter settings for the bulk work of apply and reconcile.

Both are process-wide, so they are counted: the first user sets them and the last one restores them.

- The switch interval is 0.2 ms instead of 5 ms. The apply's D1 worker hands the GIL back at every SQLite
  statement it prepares and steps (and every network wait), then waits for the decoding thread to drop it,
  up to the switch interval each time. With dozens of statements per request that waiting was most of the
  SQLite backend's time: in an interleaved A/B run of the backfill benchmark (300k rows, 3 runs each)
  50,600 rows/s at 5 ms against 64,100 at 0.2 ms.
- The cyclic garbage collector's first threshold is 20,000 allocations instead of 700. A batch allocates
  hundreds of thousands of short-lived, acyclic objects (rows, literals, values), which the default
  threshold had the collector scan again and again; the larger threshold bounds the extra memory to 20,000
  objects. Measured here: backfill of 500k rows, interleaved, 97,229 and 84,074 rows/s against 80,976 and
  77,055; reconcile of 200k rows 4.1 s against 6.3 s.
- With glibc, `malloc` keeps at most 2 arenas and serves blocks of 128 KB and more by mmap (`tune_malloc`,
  once per process, never undone: glibc has no way to read the old settings back). The apply's threads
  (reader, D1 worker, the planner's writer) each grew an arena of their own, and glibc's sliding mmap
  threshold put the megabyte frames and result buffers in them, where freed space stays resident. Measured
  on the apply_drain workload: peak memory of the apply's process 108 -> 99 MB at 1M changes, 99 -> 94 MB
  at 100k, the rate unchanged within the noise.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SWITCH_SECONDS = 0.0002
GC_THRESHOLD = 20_000

_lock = threading.Lock()
_users = 0
_saved_switch = 0.005
_saved_gc: tuple[int, int, int] = (700, 10, 10)


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's malloc.h
MALLOC_ARENAS = 2
MMAP_THRESHOLD_BYTES = 128 * 1024
_malloc_tuned: bool | None = None
_malloc_lock = threading.Lock()


def tune_malloc() -> bool:
    """The malloc settings above, once per process; whether they are in force (glibc only)."""
    global _malloc_tuned
    with _malloc_lock:
        if _malloc_tuned is None:
            _malloc_tuned = _mallopt(_M_ARENA_MAX, MALLOC_ARENAS) and _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        return _malloc_tuned


def _mallopt(param: int, value: int) -> bool:
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # glibc only: elsewhere there is no such symbol
    except (OSError, AttributeError):
        return False
    return bool(mallopt(param, value))


@contextmanager
def throughput() -> Iterator[None]:
    """The settings above for the duration of the `with` block (nested and concurrent uses are counted;
    the malloc settings stay)."""
    global _users, _saved_switch, _saved_gc
    tune_malloc()
    with _lock:
        if _users == 0:
            _saved_switch = sys.getswitchinterval()
            _saved_gc = gc.get_threshold()
            sys.setswitchinterval(min(_saved_switch, SWITCH_SECONDS))
            gc.set_threshold(max(_saved_gc[0], GC_THRESHOLD), _saved_gc[1], _saved_gc[2])
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.setswitchinterval(_saved_switch)
                gc.set_threshold(*_saved_gc)

import gc
import platform
import sys
import threading

import pytest

from d1sync_dagster.engine.tuning import GC_THRESHOLD, SWITCH_SECONDS, throughput


def test_settings_hold_while_any_user_runs_and_are_restored_after_the_last():
    before = (sys.getswitchinterval(), gc.get_threshold())
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with throughput():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with throughput():
        assert sys.getswitchinterval() == pytest.approx(SWITCH_SECONDS)
        assert gc.get_threshold()[0] == max(before[1][0], GC_THRESHOLD)
        t.start()
        assert inside.wait(10)
    # The first user left; the second still runs: the settings stay.
    assert sys.getswitchinterval() == pytest.approx(SWITCH_SECONDS)
    release.set()
    t.join(10)
    assert (sys.getswitchinterval(), gc.get_threshold()) == before


def test_settings_are_restored_when_the_block_raises():
    before = (sys.getswitchinterval(), gc.get_threshold())
    try:
        with throughput():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert (sys.getswitchinterval(), gc.get_threshold()) == before


def test_reconcile_runs_under_the_tuning(pair):
    """Reconcile is decorated with it: the settings hold while it runs and are restored after."""
    from d1sync_dagster.engine.reconcile import reconcile

    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'x')")
    seen = []
    before = gc.get_threshold()
    reconcile(pair.pg, pair.d1, pair.schema, on_chunk=lambda *_: seen.append(gc.get_threshold()[0]))
    assert seen and all(t == max(before[0], GC_THRESHOLD) for t in seen)
    assert gc.get_threshold() == before


_FRAGMENTS = """
import ctypes, sys
from d1sync_dagster.engine import tuning
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = tuning.tune_malloc() if sys.argv[1] == "tuned" else False
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
big = libc.malloc(8 << 20)
libc.free(big)  # untuned, glibc now serves blocks up to 8 MB from its heap
blocks = [libc.malloc(1 << 20) for _ in range(64)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
before = rss()
for b in blocks[:-1]:
    libc.free(b)  # the last one pins the heap's top: freed space below it stays resident
print(tuned, tuning.tune_malloc() == tuned or not tuned, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_malloc_gives_freed_large_blocks_back():
    import subprocess

    def freed(mode: str) -> tuple[str, str, int]:
        out = subprocess.run([sys.executable, "-c", _FRAGMENTS, mode], capture_output=True, text=True, check=True)
        tuned, again, mb = out.stdout.split()
        return tuned, again, int(mb)

    tuned, idempotent, given_back = freed("tuned")
    assert tuned == "True" and idempotent == "True" and given_back >= 60
    assert freed("plain")[2] < 10  # what the tuning fixes: without it the freed megabytes stay resident

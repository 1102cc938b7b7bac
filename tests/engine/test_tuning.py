import gc
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

import threading

import pytest

from d1sync_dagster.engine.prefetch import read_ahead


def test_items_arrive_in_order_and_all_of_them():
    assert list(read_ahead(iter(range(1000)), name="t")) == list(range(1000))
    assert list(read_ahead(iter([]), name="t")) == []


def test_an_error_of_the_producer_is_raised_in_the_caller_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise RuntimeError("D1 read failed")

    got = []
    with pytest.raises(RuntimeError, match="D1 read failed"):
        for x in read_ahead(items(), name="t"):
            got.append(x)
    assert got == [1, 2]


def test_leaving_early_stops_the_producer_without_reading_everything():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    before = threading.active_count()
    for x in read_ahead(items(), name="t"):
        if x == 3:
            break
    assert threading.active_count() == before  # the thread is gone once the loop is left
    assert len(produced) <= 6  # at most two items ahead of the caller

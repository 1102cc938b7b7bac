"""Coalescing a batch per key: the net effect equals replaying every change in order."""

from hypothesis import given
from hypothesis import strategies as st

from d1sync_dagster.core.changes import Change
from d1sync_dagster.core.coalesce import TableChanges, coalesce


def up(i, key, v, old_key=None, unchanged=None):
    return Change(i, "t", "upsert", (key,), {"k": key, "v": v}, (old_key,) if old_key is not None else None, unchanged)


def test_many_updates_of_one_key_are_one_upsert_of_the_last_row():
    tc = coalesce([up(1, 1, "a"), up(2, 1, "b"), up(3, 1, "c")])["t"]
    assert tc.upserts == {(1,): {"k": 1, "v": "c"}} and not tc.deletes and tc.messages == 3


def test_insert_then_delete_is_a_delete():
    tc = coalesce([up(1, 1, "a"), Change(2, "t", "delete", (1,))])["t"]
    assert tc.upserts == {} and tc.deletes == {(1,)}


def test_a_key_change_deletes_the_old_key():
    tc = coalesce([up(1, 2, "a", old_key=1)])["t"]
    assert tc.deletes == {(1,)} and set(tc.upserts) == {(2,)}


def test_truncate_drops_what_came_before_and_later_deletes_need_no_statement():
    tc = coalesce([up(1, 1, "a"), Change(2, "t", "delete", (5,)), Change(3, "t", "truncate"), up(4, 2, "b")])["t"]
    assert tc.truncate and set(tc.upserts) == {(2,)} and not tc.deletes
    tc = coalesce([Change(1, "t", "truncate"), up(2, 3, "x"), Change(3, "t", "delete", (3,))])["t"]
    assert tc.truncate and not tc.upserts and not tc.deletes


def test_columns_left_alone_are_those_no_update_of_the_batch_changed():
    tc = coalesce([up(1, 1, "a", unchanged=frozenset({"k", "v"})), up(2, 1, "b", unchanged=frozenset({"k"}))])["t"]
    assert tc.changed_columns((1,)) == frozenset({"v"})
    # An insert (no old row) makes the prior row unknown: everything may have changed.
    tc = coalesce([up(1, 1, "a"), up(2, 1, "b", unchanged=frozenset({"k", "v"}))])["t"]
    assert tc.changed_columns((1,)) is None


def _apply(state: dict, tc: TableChanges) -> dict:
    out = {} if tc.truncate else dict(state)
    for k in tc.deletes:
        out.pop(k, None)
    out.update(tc.upserts)
    return out


def _replay(state: dict, changes: list[Change]) -> dict:
    out = dict(state)
    for ch in changes:
        if ch.op == "truncate":
            out.clear()
        elif ch.op == "delete":
            out.pop(ch.key, None)
        else:
            if ch.old_key is not None:
                out.pop(ch.old_key, None)
            out[ch.key] = ch.row
    return out


keys = st.integers(0, 5)
change = st.one_of(
    st.tuples(st.just("upsert"), keys, st.integers(0, 3), st.one_of(st.none(), keys)),
    st.tuples(st.just("delete"), keys, st.just(0), st.none()),
    st.tuples(st.just("truncate"), st.just(0), st.just(0), st.none()),
)


@given(st.dictionaries(keys.map(lambda k: (k,)), st.just({"k": 0, "v": 0})), st.lists(change, max_size=30))
def test_the_net_effect_equals_replaying_each_change_in_order(state, ops):
    changes = []
    for i, (op, k, v, old) in enumerate(ops):
        if op == "upsert":
            changes.append(up(i, k, v, old_key=old if old != k else None))
        elif op == "delete":
            changes.append(Change(i, "t", "delete", (k,)))
        else:
            changes.append(Change(i, "t", "truncate"))
    net = coalesce(changes).get("t", TableChanges())
    assert not (net.deletes & set(net.upserts))  # order-free: deletes and upserts never share a key
    assert _apply(state, net) == _replay(state, changes)

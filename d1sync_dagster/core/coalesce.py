"""Within one read batch only the last state of each primary key matters.

Rules, applied in msg_id order:
- an upsert replaces whatever the batch held for its key (many updates are one upsert);
- a delete drops a pending upsert of its key (insert-then-delete is a delete);
- an upsert whose UPDATE moved the row (old_key != key) first deletes the old key;
- TRUNCATE is a barrier: everything earlier for the table is dropped, the table is emptied first, and later
  changes apply on top. After a TRUNCATE a delete needs no statement (the row is gone already).

For each upserted key the batch also tracks which columns its UPDATEs left untouched since the row's state
before the batch (known when the first change to the key is an UPDATE carrying the whole old row), so the
planner can assign only the columns that changed: SQLite rewrites every index whose columns are assigned,
and D1 bills each index entry as a row written.

The result is order-free: the deleted keys and the upserted keys of a table are disjoint, so statements for
one table can run deletes then upserts, after the truncate when there is one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from d1sync_dagster.core.changes import Change, Key, Row


@dataclass
class TableChanges:
    """The net effect of a batch on one table."""

    truncate: bool = False
    upserts: dict[Key, Row] = field(default_factory=dict)
    deletes: set[Key] = field(default_factory=set)
    # Per upserted key: columns still equal to the row before the batch (None: that row is unknown).
    unchanged: dict[Key, frozenset[str] | None] = field(default_factory=dict)
    messages: int = 0

    def delete(self, key: Key) -> None:
        self.unchanged[key] = None
        self.upserts.pop(key, None)
        if not self.truncate:
            self.deletes.add(key)

    def upsert(self, key: Key, row: Row, unchanged: frozenset[str] | None = None) -> None:
        if key in self.unchanged:
            prior = self.unchanged[key]
            self.unchanged[key] = None if prior is None or unchanged is None else prior & unchanged
        else:
            self.unchanged[key] = None if self.truncate else unchanged
        self.deletes.discard(key)
        self.upserts[key] = row

    def changed_columns(self, key: Key) -> frozenset[str] | None:
        """Columns whose value may differ from the row before the batch; None when that row is unknown."""
        same = self.unchanged.get(key)
        return None if same is None else frozenset(c for c in self.upserts[key] if c not in same)


def coalesce(changes: Iterable[Change]) -> dict[str, TableChanges]:
    """Net changes per table, in first-seen table order."""
    out: dict[str, TableChanges] = {}
    for ch in changes:
        tc = out.setdefault(ch.table, TableChanges())
        tc.messages += 1
        if ch.op == "truncate":
            tc.truncate = True
            tc.upserts.clear()
            tc.deletes.clear()
            tc.unchanged.clear()
        elif ch.op == "delete":
            tc.delete(ch.key)
        else:
            if ch.old_key is not None:
                tc.delete(ch.old_key)
            assert ch.row is not None
            tc.upsert(ch.key, ch.row, ch.unchanged)
    return out

"""Source transactions: the vocabulary of publishing each Postgres transaction to D1 whole, and of the
read-your-writes position. Pure: no I/O.

- Every trigger message carries `"xid"`, its source transaction (`pg_current_xact_id()`, `sql/capture.py`).
  Messages without one (the seed's trigger, its backfill snippet, repairs, range markers) are each a
  transaction of their own.
- msg_id is taken at insert, not at commit, so one transaction's messages interleave with others'. A read
  page is cut only where no transaction straddles the cut (`valid_cut`), from each transaction's first and
  last msg_id among the messages visible in one snapshot (`TxnRange`). Whatever the page size, a transaction
  is never split between D1 commits by the read.
- A `Snapshot` (`xmin:xmax:xip`, Postgres's `pg_snapshot` text) is the read-your-writes position: after a
  D1 commit that recorded it, D1 holds every transaction the snapshot sees as committed (`visible`), and
  none it sees as running; an older transaction still open stays in `xip` without hiding newer ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


def xid_of(payload: Any) -> int | None:
    """The source transaction of a message, or None (the seed's shapes, backfill and repair messages)."""
    x = payload.get("xid") if isinstance(payload, dict) else None
    return x if x.__class__ is int and x > 0 else None


class TxnRange(NamedTuple):
    """One transaction's first and last msg_id among the messages visible in a snapshot (`xid` None for a
    message without one)."""

    lo: int
    hi: int
    xid: int | None = None


def valid_cut(ranges: Iterable[TxnRange], at_least: int) -> int:
    """The smallest msg_id C >= `at_least` at which no transaction straddles (none has lo <= C < hi): a page
    that ends at C holds every transaction it touches whole."""
    cut = at_least
    for lo, hi, _ in sorted(ranges, key=lambda r: r.lo):
        if lo > cut:
            break
        if hi > cut:
            cut = hi
    return cut


def groups(xids: Sequence[int | None]) -> list[list[int]]:
    """Indexes of a page's messages grouped by transaction, groups in the order of their last message (which
    keeps every key's order: a transaction that waited for another's row lock writes its message for that row
    after the other's last one). Messages without a transaction are groups of one."""
    last: dict[object, int] = {}
    members: dict[object, list[int]] = {}
    for i, x in enumerate(xids):
        key: object = x if x is not None else ("msg", i)
        members.setdefault(key, []).append(i)
        last[key] = i
    return [members[k] for k in sorted(members, key=last.__getitem__)]


@dataclass(frozen=True)
class Snapshot:
    """A Postgres snapshot `xmin:xmax:xip,...` (`pg_current_snapshot()::text`)."""

    xmin: int
    xmax: int
    xip: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        try:
            xmin, xmax, xip = text.strip().split(":")
            running = tuple(sorted(int(x) for x in xip.split(",") if x))
            snap = cls(int(xmin), int(xmax), running)
        except ValueError:
            raise ValueError(f"not a Postgres snapshot (xmin:xmax:xip): {text[:80]!r}") from None
        if not (0 < snap.xmin <= snap.xmax) or any(not (snap.xmin <= x < snap.xmax) for x in running):
            raise ValueError(f"not a Postgres snapshot (xmin <= xip < xmax): {text[:80]!r}")
        return snap

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, self.xip))}"

    def visible(self, xid: int) -> bool:
        """Whether transaction `xid` had ended when the snapshot was taken (Postgres's
        `pg_visible_in_snapshot`): for a committed transaction, its effects are in D1 once this snapshot is
        D1's position. An aborted one has no effects, so it counts as in D1 too."""
        if xid < self.xmin:
            return True
        if xid >= self.xmax:
            return False
        return xid not in self.xip


#: A position lists at most this many transactions still to come; past it, the last whole one stays.
MAX_PENDING = 1000


def partial(snapshot: str, ranges: Iterable[TxnRange], cut: int) -> str | None:
    """The position D1 reaches when a window's pages up to `cut` are in D1: the window's snapshot, with every
    transaction of the window not yet whole in D1 (a message past `cut`) counted as still running. It lets
    the position move while a backlog is drained, before the window's last page. None when more than
    `MAX_PENDING` transactions are still to come (the position would be too long to record; it waits)."""
    snap = Snapshot.parse(snapshot)
    pending = {r.xid for r in ranges if r.hi > cut and r.xid is not None}
    if len(pending) > MAX_PENDING:
        return None
    xip = tuple(sorted(set(snap.xip) | pending))
    return str(Snapshot(xip[0] if xip else snap.xmax, snap.xmax, xip))


def applied(position: str | None, xid: int) -> bool:
    """Whether transaction `xid`'s effects are in D1, given the position D1 recorded (`_d1sync_meta`
    `position`; None before the first). The Python twin of `readers/position.ts`'s `applied`."""
    return position is not None and Snapshot.parse(position).visible(int(xid))

"""Read pages of whole source transactions, each with the read-your-writes position it completes.

A page is the oldest unclaimed messages, as before, but read within one Postgres snapshot and cut where no
transaction straddles (`core/txns.py`). While pages are short of `qty` (the streaming case: the page holds
every message that snapshot sees), each page is whole by construction and completes its snapshot: once
it is in D1, so is every transaction that snapshot sees as committed. When a page is full (a backlog), the
snapshot is kept for the pages that follow (a window): the first full page reads each transaction's first
and last msg_id in the window (one pass, `PgmqClient.txn_ranges`), and every page of the window ends at a
cut no transaction straddles, reading past `qty` when one does. The page that reaches the window's end
completes its snapshot; each page before it moves the position too, with the window's transactions still to
come counted as running. Messages committed after the window's snapshot wait for the next window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from d1sync_dagster.clients.pgmq import PgmqClient, QueueMessage
from d1sync_dagster.core.txns import TxnRange, partial, valid_cut

#: How many messages an extension to a cut may read at most (a transaction larger than this is read anyway,
#: in as many reads as it takes).
_EXTEND = 100_000


@dataclass
class Page:
    msgs: list[QueueMessage]
    #: The position (a snapshot, `xmin:xmax:xip`) D1 is complete up to once this page, and every page before
    #: it, is in D1: the snapshot itself at the end of a window, else the window's snapshot with its
    #: transactions still to come counted as running (`core/txns.py`, `partial`).
    position: str | None
    #: The page completes its snapshot: with it and the pages before it, D1 holds every message that snapshot
    #: sees (the backlog as it stood when the snapshot was taken).
    complete: bool = True


@dataclass
class _Window:
    snapshot: str
    ranges: list[TxnRange] = field(default_factory=list)

    @property
    def end(self) -> int:
        return max((r.hi for r in self.ranges), default=0)


class TxnPages:
    """The reader of one apply (on the reader's connection)."""

    def __init__(self, pg: PgmqClient) -> None:
        self.pg = pg
        self.window: _Window | None = None

    def read(self, qty: int, *, skip: Sequence[int], as_text: bool) -> Page:
        w = self.window
        snapshot = w.snapshot if w is not None else self.pg.snapshot()
        msgs = self.pg.read_in_order(qty, skip=skip, as_text=as_text, within=snapshot)
        if len(msgs) < qty:  # every message this snapshot sees is in this page or in one before it
            self.window = None
            return Page(msgs, snapshot)
        if w is None:
            w = self.window = _Window(snapshot, [TxnRange(*r) for r in self.pg.txn_ranges(skip=skip, within=snapshot)])
        last = msgs[-1].msg_id
        cut = valid_cut(w.ranges, last)
        while last < cut:  # a transaction straddles the page's end: read on to the cut
            seen = [*skip, *(m.msg_id for m in msgs)]
            more = self.pg.read_in_order(_EXTEND, skip=seen, as_text=as_text, within=snapshot, upto=cut)
            if not more:
                break
            msgs += more
            last = msgs[-1].msg_id
        if cut >= w.end:
            self.window = None
            return Page(msgs, snapshot)
        return Page(msgs, partial(snapshot, w.ranges, cut), complete=False)

"""Publishing a planned read batch to D1: every source transaction becomes visible at once.

A read batch holds whole source transactions (the reader cuts pages where no transaction straddles,
`core/txns.py`). It goes to each database in one D1 request when its statements fit `transaction_bytes` (a
request is one D1 transaction: the Worker binding's `batch()`, and the HTTP API's batch on D1's engine, as
the stand-in runs it), with the bookkeeping and the read-your-writes position riding in it. When they do not fit, or D1
answers that it is overloaded, the batch goes transaction by transaction: consecutive transactions packed
into requests within the budget (`request_bytes`), each transaction inside one request. A single transaction
larger than the budget still goes whole in one request, up to `transaction_bytes` (50 MB by default; D1's
own bound is its 30 s per query). A transaction larger than that, or one whose request D1 answers as
overloaded, is staged and published by one request (`core/staging.py`); only on a sharded target is it sent
in several instead (a warning says so, the run counts it in `ApplyReport.split_transactions`).

When D1 refuses a statement for its content, the batch is bisected by transactions, not by changes: a
transaction D1 refuses goes to the dead-letter queue whole, with D1's reason, and nothing of it is visible;
the others apply. Bisection spends at most `max_bisect_requests` requests per run; past that, the
transactions before the current one are settled and the rest stays queued (`IsolationStopped`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import ShardedD1, all_databases, rules_of
from d1sync_dagster.clients.pgmq import QueueMessage
from d1sync_dagster.core.batch import decode_batch, plan_batch, plan_changes
from d1sync_dagster.core.changes import Change, Poison
from d1sync_dagster.core.coalesce import coalesce
from d1sync_dagster.core.plan import Planned, requests
from d1sync_dagster.core.staging import staging
from d1sync_dagster.core.statements import MAX_STATEMENT_BYTES, Statement
from d1sync_dagster.core.txns import groups, xid_of
from d1sync_dagster.engine.reports import ApplyReport
from d1sync_dagster.errors import D1Error
from d1sync_dagster.exactjson import loads_exact
from d1sync_dagster.schema import Schema


class SendOptions(Protocol):
    """What publishing reads of the apply's options (`ApplyOptions`)."""

    @property
    def request_bytes(self) -> int: ...

    @property
    def transaction_bytes(self) -> int: ...

    @property
    def max_bisect_requests(self) -> int: ...


log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A read batch, decoded and planned, waiting for (or being sent to) D1."""

    msgs: list[QueueMessage]
    poison: list[Poison]
    planned: list[Planned]
    meta: list[Statement]
    tables: dict[int, str | None]  # msg_id -> table
    #: The messages of drifted tables, moved to the held queue instead of applied (`engine/drift.py`).
    held: list[QueueMessage] = field(default_factory=list)
    #: The read-your-writes position D1 reaches with this batch (`core/txns.py`), recorded in its last request.
    position: list[Statement] = field(default_factory=list)


class IsolationStopped(Exception):
    """Bisection spent the run's request budget: the messages in `settled` are applied or refused."""

    def __init__(self, settled: set[int], refused: list[Poison], error: D1Error) -> None:
        super().__init__(str(error))
        self.settled, self.refused, self.error = settled, refused, error


class _TooLarge(Exception):
    """A batch's statements for one database need more than one request."""


def decoded(msgs: list[QueueMessage], *, backfill_only: bool = False) -> list[QueueMessage]:
    """The batch with the messages read as text (`bytes`) decoded, as the connection decodes JSON. With
    `backfill_only`, only those that may be backfill messages (range markers are resolved by the reader; a
    trigger change's text rarely holds the word, and when a value does, the message is just decoded here,
    which changes nothing but where)."""
    return [
        m._replace(message=loads_exact(m.message))
        if m.message.__class__ is bytes and (not backfill_only or b'"BACKFILL"' in m.message)
        else m
        for m in msgs
    ]


def commit(d1: D1Client, schema: Schema, p: Prepared, report: ApplyReport, options: SendOptions) -> list[Poison]:
    """Publish a prepared batch (see the module); returns the changes D1 refused (whole transactions)."""
    if not p.planned:
        if p.position:  # nothing to write, but D1 is complete up to a later snapshot: say so
            send(d1, [], report, options, p.meta + p.position, atomic=True)
        return []
    try:
        # The whole batch in one request while it fits `transaction_bytes`: the request budget only packs
        # transactions once D1 has said it is overloaded (re-planning a large batch costs its planning again).
        send(
            d1,
            p.planned,
            report,
            options,
            p.meta + p.position,
            atomic=True,
            max_bytes=options.transaction_bytes,
            whole=True,
        )
        return []
    except _TooLarge:
        msgs = decoded(p.msgs)
        xids = {xid_of(m.message) for m in msgs}
        if len(xids) == 1 and None not in xids and not isinstance(d1, ShardedD1):
            _staged(d1, schema, msgs, report, options, p.meta + p.position)  # one transaction: no re-planning
            return []
    except D1Error as e:
        if e.kind != "overloaded" and not e.bisectable:
            raise
        if e.bisectable:
            refused = _isolate(d1, schema, p, report, options)
            if p.position:  # every transaction of the batch is settled now: the position may move
                send(d1, [], report, options, p.position, atomic=True)
            return refused
        log.warning("D1 is overloaded (%s); sending the batch transaction by transaction", e)
    _by_transaction(d1, schema, decoded(p.msgs), report, options, p.meta + p.position)
    return []


def _by_transaction(
    d1: D1Client,
    schema: Schema,
    msgs: list[QueueMessage],
    report: ApplyReport,
    options: SendOptions,
    meta: list[Statement],
) -> None:
    """Send the batch's transactions in order, as many whole ones per request as fit (halving the budget when
    D1 is overloaded); the bookkeeping rides in the last request."""
    rules = rules_of(d1)
    units = [[msgs[i] for i in g] for g in groups([xid_of(m.message) for m in msgs])]
    budget = options.request_bytes
    start = 0
    while start < len(units):
        end, size = start, 0
        while end < len(units):
            n = sum(_size(p) for p in plan_batch(schema, units[end], rules).planned)
            if end > start and size + n > budget:
                break
            size, end = size + n, end + 1
        chunk = [m for u in units[start:end] for m in u]
        planned = plan_batch(schema, chunk, rules).planned
        tail = meta if end == len(units) else []
        if end - start == 1:
            _one_transaction(d1, schema, units[start], planned, report, options, tail)
            start = end
            continue
        try:
            send(d1, planned, report, options, tail, atomic=True, max_bytes=budget)
        except _TooLarge:  # several transactions overshoot together: send fewer
            budget = max(1, budget // 2)
            continue
        except D1Error as e:
            if e.kind != "overloaded":
                raise
            budget = max(1, budget // 2)
            log.warning("D1 is overloaded (%s); %d transactions per request at most now", e, max(1, (end - start) // 2))
            continue
        start = end


def _one_transaction(
    d1: D1Client,
    schema: Schema,
    msgs: list[QueueMessage],
    planned: list[Planned],
    report: ApplyReport,
    options: SendOptions,
    meta: list[Statement],
) -> None:
    """One transaction whole in one request, past the request budget, up to `options.transaction_bytes`. A
    larger one, or one D1 is overloaded by, is staged and published by one request (`core/staging.py`); only
    on a sharded target is it sent in several instead (with a warning)."""
    try:
        send(d1, planned, report, options, meta, atomic=True, max_bytes=options.transaction_bytes, whole=True)
        return
    except _TooLarge:
        pass
    except D1Error as e:
        if e.kind != "overloaded":
            raise
        log.warning("D1 is overloaded by one transaction's %d statements (%s)", len(planned), e)
    if isinstance(d1, ShardedD1):
        send(d1, planned, report, options, meta, atomic=False)
        return
    _staged(d1, schema, msgs, report, options, meta)


def _staged(
    d1: D1Client,
    schema: Schema,
    msgs: list[QueueMessage],
    report: ApplyReport,
    options: SendOptions,
    meta: list[Statement],
) -> None:
    """Stage one transaction in D1 over as many requests as it takes, then publish it with one request."""
    changes, _ = decode_batch(schema, decoded(msgs))
    st = staging(schema, coalesce(changes), limit=max(1_000, min(options.request_bytes, MAX_STATEMENT_BYTES)))
    rows = sum(p.rows for p in st.publish)
    log.warning("staging a transaction of %d row changes in D1: larger than one request, published by one", rows)
    _plain(d1, st.prepare, report)
    budget = options.request_bytes
    load = [Planned("", "stage", 0, s) for s in st.load]
    while load:
        group = requests(load, max_bytes=budget)[0]
        try:
            _plain(d1, [p.statement for p in group], report)
        except D1Error as e:
            if e.kind != "overloaded" or len(group) == 1:
                raise
            budget = max(1, budget // 4)
            continue
        load = load[len(group) :]
    _request(d1, st.publish, st.cleanup + meta, report)
    report.staged_transactions += 1


def _plain(d1: D1Client, statements: list[Statement], report: ApplyReport) -> None:
    """A request that is bookkeeping only (staging): counted as a request, not as the tables' changes."""
    try:
        d1.batch(statements)
    finally:
        with _counting:
            report.requests += 1


def _size(p: Planned) -> int:
    return len(p.statement.sql.encode()) + sum(len(str(x).encode()) for x in p.statement.params)


def _isolate(d1: D1Client, schema: Schema, p: Prepared, report: ApplyReport, options: SendOptions) -> list[Poison]:
    """Apply the batch's transactions in halves, in order, splitting again where D1 refuses the content,
    down to the single transactions it refuses (returned as poison, every message of each). Spends at most
    `options.max_bisect_requests` D1 requests; past that it stops with the transactions before the current
    one settled (`IsolationStopped`)."""
    msgs = decoded(p.msgs)
    changes, _ = decode_batch(schema, msgs)
    xid = {m.msg_id: xid_of(m.message) for m in msgs}
    units = [[changes[i] for i in g] for g in groups([xid[c.msg_id] for c in changes])]
    refused: list[Poison] = []
    with_changes = {c.msg_id for c in changes}
    settled: set[int] = {m.msg_id for m in msgs if m.msg_id not in with_changes}  # poison only: nothing to send
    start = report.requests
    mid = len(units) // 2
    pending: deque[tuple[int, int]] = deque([(0, mid), (mid, len(units))])
    while pending:
        lo, hi = pending.popleft()
        if lo == hi:
            continue
        if report.requests - start >= options.max_bisect_requests:
            error = D1Error(
                f"isolating the transactions D1 refuses took {report.requests - start} requests, this run's limit "
                f"(max_bisect_requests); {len(refused)} refused changes found so far are dead-lettered and the rest "
                "stays queued for the next run",
                kind="temporary",
            )
            raise IsolationStopped(settled, refused, error)
        part: list[Change] = [c for u in units[lo:hi] for c in u]
        try:
            send(d1, plan_changes(schema, part, rules_of(d1)), report, options, p.meta, atomic=False)
        except D1Error as e:
            if not e.bisectable:
                raise
            if hi - lo == 1:
                ids = sorted({c.msg_id for c in part})
                tables = sorted({c.table for c in part})
                log.warning("D1 refused transaction %s (%d changes to %s): %s", xid[ids[0]], len(part), tables, e)
                why = f"D1 refused a change of its transaction (xid {xid[ids[0]]}, {len(part)} changes): {e}"
                refused += [Poison(i, why, part[0].table) for i in ids]
                settled.update(ids)
                continue
            half = (lo + hi) // 2
            pending.extendleft([(half, hi), (lo, half)])  # left half first: per-key order is kept
            continue
        settled.update(c.msg_id for c in part)
    return refused


#: Counting from the threads that write shards at once.
_counting = threading.Lock()


def send(
    d1: D1Client,
    planned: list[Planned],
    report: ApplyReport,
    options: SendOptions,
    meta: list[Statement],
    *,
    atomic: bool,
    max_bytes: int | None = None,
    whole: bool = False,
) -> None:
    """Send each database its statements (`_send_to`); the shards of a `ShardedD1` concurrently, each in
    order (order only matters within one database). Every database the batch touches gets the
    bookkeeping. `whole`: one transaction, which no statement count splits."""
    if not isinstance(d1, ShardedD1):
        _send_to(d1, planned, report, options, meta, atomic, max_bytes, whole)
        return
    by_shard: dict[str | None, list[Planned]] = {}
    for p in planned:
        by_shard.setdefault(p.shard, []).append(p)
    if not planned and meta:  # only the bookkeeping: every database records the position it reached
        by_shard = {name: [] for name, _ in all_databases(d1)}

    def to(group: list[Planned]) -> Callable[[D1Client], None]:
        return lambda client: _send_to(client, group, report, options, meta, atomic, max_bytes, whole)

    d1.send_each({shard: to(group) for shard, group in by_shard.items()})


_UNLIMITED = 1 << 62

#: The smallest request body a split transaction shrinks to when D1 is overloaded (one statement per request).
_MIN_REQUEST_BYTES = 1


def _send_to(
    d1: D1Client,
    planned: list[Planned],
    report: ApplyReport,
    options: SendOptions,
    meta: list[Statement],
    atomic: bool,
    max_bytes: int | None,
    whole: bool = False,
) -> None:
    """Send statements to one database in order, the bookkeeping riding in the last request. `atomic`: in
    one request or not at all (`_TooLarge`; an overloaded D1 is raised). Else in as few requests as the
    budget allows, which a single transaction too large for one request is (with a warning); when D1 answers
    that it is overloaded, what is not yet sent goes again in requests a quarter the size."""
    budget = max_bytes or options.request_bytes
    if atomic:
        if len(requests(planned, max_bytes=budget, max_statements=_UNLIMITED if whole else 500)) > 1:
            raise _TooLarge
        _request(d1, planned, meta, report)
        return
    rest = planned
    parts = requests(rest, max_bytes=budget)
    if len(parts) > 1:
        report.split_transactions += 1
        log.warning(
            "a transaction's %d statements exceed one D1 request (%d bytes): it is published in %d requests, "
            "so readers may see it in part",
            len(planned),
            budget,
            len(parts),
        )
    while True:
        parts = requests(rest, max_bytes=budget)
        for i, group in enumerate(parts):
            try:
                _request(d1, group, meta if i == len(parts) - 1 else [], report)
            except D1Error as e:
                if e.kind != "overloaded" or budget <= _MIN_REQUEST_BYTES:
                    raise
                budget = max(_MIN_REQUEST_BYTES, budget // 4)
                rest = [p for g in parts[i:] for p in g]
                log.warning("D1 is overloaded (%s); sending the rest in requests of at most %d bytes", e, budget)
                break
        else:
            return


def _request(d1: D1Client, group: list[Planned], meta: list[Statement], report: ApplyReport) -> None:
    """One D1 request (one D1 transaction): the statements, then the bookkeeping."""
    try:
        results = d1.batch([p.statement for p in group] + meta)
    finally:
        with _counting:
            report.requests += 1
    with _counting:
        report.count_sent(group, [res.rows_written for res in results])

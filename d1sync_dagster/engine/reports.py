"""What an apply run reports: figures per table and for the run, shared by the CLI, Dagster and backfill."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from operator import attrgetter
from typing import Any, Protocol

from d1sync_dagster.core.changes import Poison
from d1sync_dagster.core.plan import Planned


class _Enqueued(Protocol):
    @property
    def msg_id(self) -> int: ...

    @property
    def enqueued_at(self) -> datetime: ...


_MSG_ID, _ENQUEUED_AT = attrgetter("msg_id"), attrgetter("enqueued_at")


@dataclass
class TableStats:
    messages: int = 0
    upserts: int = 0
    deletes: int = 0
    truncates: int = 0
    dead_lettered: int = 0
    #: Changes moved to the held queue because the table's source drifted (`engine/drift.py`).
    held: int = 0
    #: Held changes applied in this run, once schema.json followed.
    released: int = 0
    statements: int = 0
    rows_written: int = 0
    #: Age of the oldest change applied to the table in the run, from enqueue to the run's read.
    lag_seconds: float | None = None


_SUMMED = frozenset(
    {
        "messages",
        "batches",
        "requests",
        "statements",
        "rows_written",
        "rows_sent",
        "dead_lettered",
        "duration_seconds",
        "vacuum_seconds",
        "held",
        "released",
        "split_transactions",
        "staged_transactions",
    }
)


@dataclass
class ApplyReport:
    tables: dict[str, TableStats] = field(default_factory=dict)
    messages: int = 0
    batches: int = 0
    requests: int = 0
    statements: int = 0
    rows_written: int = 0
    rows_sent: int = 0
    dead_lettered: int = 0
    duration_seconds: float = 0.0
    drained: bool = False
    #: The run ended at the backlog it found: every change committed when it began is in D1, and the changes
    #: committed while it ran wait for the next run (they came in as fast as it applied them; a run that
    #: follows the queue, the streaming one, goes on instead).
    caught_up: bool = False
    skipped: str | None = None
    vacuumed: bool = False
    #: Of `duration_seconds`, the time the queue table's VACUUM after the drain took (the queue was empty and
    #: D1 complete before it started).
    vacuum_seconds: float = 0.0
    #: Peak resident memory of the planner process (`engine/planner.py`) in MB, when one ran (Linux).
    planner_peak_mb: float | None = None
    held: int = 0
    released: int = 0
    #: The read-your-writes position D1 recorded last in this run (a Postgres snapshot, `core/txns.py`).
    position: str | None = None
    #: Transactions too large for one D1 request, published in several (readers may see them in part).
    split_transactions: int = 0
    #: Transactions too large for one request, staged in D1 and published by one (`core/staging.py`).
    staged_transactions: int = 0
    #: Per table whose source drifted from schema.json: each finding with its fix (`core/drift.py`).
    drift: dict[str, list[str]] = field(default_factory=dict)
    #: Per sharded table, per shard database its changes reached: [statements, D1 rows written] (what the
    #: shard's partition of the table's asset records).
    shards: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def rows_per_request(self) -> float:
        return self.rows_sent / self.requests if self.requests else 0.0

    def plus(self, later: ApplyReport) -> ApplyReport:
        """This report and a later one of the same run (the stream's apply again after a transient failure):
        counts summed, the later one's state (position, drained, drift, skipped) kept."""
        out = replace(later, tables={})
        for f in fields(ApplyReport):
            if f.name in _SUMMED:
                setattr(out, f.name, getattr(self, f.name) + getattr(later, f.name))
        out.shards = add_shards(self.shards, later.shards)
        for name in self.tables.keys() | later.tables.keys():
            a, b = self.tables.get(name, TableStats()), later.tables.get(name, TableStats())
            out.tables[name] = TableStats(
                **{
                    f.name: getattr(a, f.name) + getattr(b, f.name)
                    for f in fields(TableStats)
                    if f.name != "lag_seconds"
                },
                lag_seconds=max((x for x in (a.lag_seconds, b.lag_seconds) if x is not None), default=None),
            )
        return out

    @property
    def changes_per_second(self) -> float:
        return self.messages / self.duration_seconds if self.duration_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_per_request"] = round(self.rows_per_request, 1)
        out["changes_per_second"] = round(self.changes_per_second, 1)
        return out

    def count_messages(self, msgs: Sequence[_Enqueued], tables: dict[int, str | None], now: datetime) -> None:
        """Count a read batch's messages per table and the oldest one's lag. A batch usually holds one table's
        messages: then it is counted at once."""
        counts = Counter(map(tables.get, map(_MSG_ID, msgs)))
        if len(counts) == 1:
            oldest = {name: min(map(_ENQUEUED_AT, msgs)) for name in counts}
        else:
            oldest = {}
            for m in msgs:
                name = tables.get(m.msg_id)
                seen = oldest.get(name)
                if seen is None or m.enqueued_at < seen:
                    oldest[name] = m.enqueued_at
        for name, n in counts.items():
            stats = self.tables.get(name or "")
            if stats is not None:
                stats.messages += n
                stats.lag_seconds = max(stats.lag_seconds or 0.0, (now - oldest[name]).total_seconds())

    def count_sent(self, group: list[Planned], rows_written: list[int]) -> None:
        """Count what one D1 request carried: its statements, rows sent and rows D1 says it wrote."""
        for p, written in zip(group, rows_written, strict=False):
            stats = self.tables[p.table]
            stats.statements += 1
            stats.rows_written += written
            self.statements += 1
            self.rows_written += written
            self.rows_sent += p.rows
            if p.shard is not None:
                sent = self.shards.setdefault(p.table, {}).setdefault(p.shard, [0, 0])
                sent[0] += 1
                sent[1] += written
            if p.kind == "upsert":
                stats.upserts += p.rows
            elif p.kind == "delete":
                stats.deletes += p.rows
            else:
                stats.truncates += 1

    def count_held(self, tables: Iterable[str | None], *, released: bool = False) -> None:
        """Count changes moved to the held queue (or applied from it, `released`), one table name each."""
        what = "released" if released else "held"
        for name in tables:
            setattr(self, what, getattr(self, what) + 1)
            stats = self.tables.get(name or "")
            if stats is not None:
                setattr(stats, what, getattr(stats, what) + 1)

    def count_dead_letters(self, poison: Iterable[Poison]) -> None:
        for p in poison:
            self.dead_lettered += 1
            if p.table in self.tables:
                self.tables[p.table].dead_lettered += 1

    def merge(self, part: ApplyReport) -> None:
        """Add another run's figures to this running total (a backfill applies in several runs)."""
        for name, s in part.tables.items():
            t = self.tables.setdefault(name, TableStats())
            for f in fields(TableStats):
                if f.name != "lag_seconds":
                    setattr(t, f.name, getattr(t, f.name) + getattr(s, f.name))
            if s.lag_seconds is not None:
                t.lag_seconds = max(t.lag_seconds or 0.0, s.lag_seconds)
        for f in (
            "messages", "batches", "requests", "statements", "rows_written", "rows_sent", "dead_lettered", "held",
            "released",
        ):  # fmt: skip
            setattr(self, f, getattr(self, f) + getattr(part, f))
        self.duration_seconds += part.duration_seconds
        self.shards = add_shards(self.shards, part.shards)
        self.drained = part.drained
        self.caught_up = part.caught_up
        self.skipped = part.skipped
        self.drift = part.drift or self.drift
        self.position = part.position or self.position


def add_shards(
    a: dict[str, dict[str, list[int]]], b: dict[str, dict[str, list[int]]], sign: int = 1
) -> dict[str, dict[str, list[int]]]:
    """`ApplyReport.shards` of two reports summed (`sign` -1: `a` less `b`, what was sent in between)."""
    out = {t: {s: list(v) for s, v in per.items()} for t, per in a.items()}
    for table, per in b.items():
        for shard, (statements, written) in per.items():
            now = out.setdefault(table, {}).setdefault(shard, [0, 0])
            now[0] += sign * statements
            now[1] += sign * written
    kept = {t: {s: v for s, v in per.items() if v[0] > 0} for t, per in out.items()}
    return {t: per for t, per in kept.items() if per}

"""What an apply run counts per read batch: messages per table and the oldest one's lag, whatever mix of
tables (known, unknown, none) a batch holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from d1sync_dagster.clients.pgmq import QueueMessage
from d1sync_dagster.engine.reports import ApplyReport, TableStats

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def fresh() -> ApplyReport:
    return ApplyReport(tables={"a": TableStats(), "b": TableStats(lag_seconds=50.0)})


@given(
    batch=st.lists(st.tuples(st.sampled_from(["a", "b", "zz", None]), st.integers(0, 10**6)), max_size=40),
    one_table=st.booleans(),
)
def test_messages_and_lag_are_counted_per_table(batch, one_table):
    msgs = [QueueMessage(i, 0, NOW - timedelta(milliseconds=age), None) for i, (_, age) in enumerate(batch)]
    tables = {i: "a" if one_table else name for i, (name, _) in enumerate(batch)}
    report = fresh()
    report.count_messages(msgs, tables, NOW)
    expected = fresh()
    for m in msgs:  # one message at a time, as the rule reads
        stats = expected.tables.get(tables[m.msg_id] or "")
        if stats is not None:
            stats.messages += 1
            stats.lag_seconds = max(stats.lag_seconds or 0.0, (NOW - m.enqueued_at).total_seconds())
    assert report.tables == expected.tables

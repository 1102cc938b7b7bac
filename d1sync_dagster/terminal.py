"""What the `d1sync` command shows a person: progress bars with rate and ETA, and tables, drawn by `rich` on
a terminal; plain lines everywhere else (logs, CI, pipes), and nothing of either under `--json`.

A front-door helper of `cli.py` (nothing else imports it): `rich` comes with Dagster, so this adds no
dependency.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table


class Progress:
    """Progress on `stream` (stderr): a rich bar with the count, the rate and the ETA on a terminal (a spinner-
    less counter when the total is unknown); otherwise a plain line every 5 s and a last one at the end."""

    def __init__(self, what: str, total: int | None = None, *, stream: TextIO = sys.stderr) -> None:
        self.what, self.total, self.stream = what, total, stream
        self.tty = stream.isatty()
        self.started = self.last = time.monotonic()
        self.done: int | None = None
        self.shown: int | None = None
        self._bar: RichProgress | None = None
        if self.tty:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=stream, force_terminal=True),
                transient=False,
            )
            self._task = self._bar.add_task(what, total=total, rate="0")
            self._bar.start()

    def _line(self, done: int, now: float) -> str:
        rate = done / max(now - self.started, 1e-6)
        line = f"{self.what}: {done:,}"
        if self.total:
            left = max(self.total - done, 0)
            line += f" of ~{self.total:,} ({min(done / self.total, 1):.0%}), ETA {left / rate if rate else 0:.0f}s"
        return line + f", {rate:,.0f}/s"

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self._bar is not None:
            rate = done / max(now - self.started, 1e-6)
            total = self.total if self.total and self.total >= done else None if not self.total else done
            self._bar.update(self._task, completed=done, total=total, rate=f"{rate:,.0f}")
            return
        if now - self.last < 5:
            return
        self.last, self.shown = now, done
        self.stream.write(self._line(done, now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.done is not None and self.done != self.shown:
            self.stream.write(self._line(self.done, time.monotonic()) + " (done)\n")
        self.stream.flush()


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None, stream: TextIO | None = None
) -> None:
    """Rows under headers: a rich table on a terminal, else tab-free aligned plain text (greppable)."""
    out = stream or sys.stdout
    if out.isatty():
        table = Table(*headers, title=title, title_justify="left", expand=False)
        for row in rows:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    if title:
        out.write(title + "\n")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        out.write("  ".join(cells).rstrip() + "\n")
    out.flush()

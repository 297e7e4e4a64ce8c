"""Progress of a running batch: a rich bar on a terminal, one-line records when piped (cron,
systemd, CI logs), every ``IMAGEBATCH_PROGRESS_INTERVAL_S`` and at each 10 %."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.status import Snapshot
from worker.steps import now_iso


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA –"
    seconds = int(seconds)
    if seconds < 90:
        return f"ETA {seconds}s"
    if seconds < 5400:
        return f"ETA {seconds // 60}m{seconds % 60:02d}s"
    return f"ETA {seconds // 3600}h{seconds % 3600 // 60:02d}m"


def record(snap: Snapshot) -> str:
    """One progress line for a log file."""
    total = snap.total or 0
    share = f" ({100 * snap.done // total}%)" if total else ""
    projected = snap.projected()
    cost = snap.money.describe()
    if projected.by_currency and projected != snap.money:
        cost += f" (projected {projected.describe()})"
    parts = [
        f"progress {now_iso()}",
        f"batch {snap.batch_id}",
        f"{snap.done}/{total or '?'} done{share}",
        f"{snap.succeeded} succeeded",
        f"{snap.failed} failed",
        f"{snap.rejected} rejected",
        f"{snap.in_progress} in progress",
        cost,
        eta_text(snap.eta_s()),
    ]
    if snap.storage_waits:
        parts.append("waiting for storage")
    return " · ".join(parts)


class Display:
    """Shows a batch's progress the way the output can take it."""

    def __init__(self, console: Console, interval_s: float) -> None:
        self.console = console
        self.interactive = console.is_terminal
        self.interval_s = interval_s
        self.last_line = 0.0
        self.last_decile = -1
        self.bar = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("· {task.fields[failed]} failed · {task.fields[cost]} · {task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.interactive,
        )
        self.task: Any = None

    def __enter__(self) -> Display:
        self.bar.__enter__()
        self.task = self.bar.add_task("generating", total=None, failed=0, cost="", eta="")
        self.last_line = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bar.__exit__(exc_type, exc, tb)

    def update(self, snap: Snapshot) -> None:
        if self.interactive:
            projected = snap.projected()
            cost = snap.money.describe()
            if projected.by_currency and projected != snap.money:
                cost += f" of ~{projected.describe()}"
            waiting = " · waiting for storage" if snap.storage_waits else ""
            self.bar.update(
                self.task,
                total=snap.total,
                completed=snap.done,
                failed=snap.failed + snap.rejected,
                cost=cost,
                eta=eta_text(snap.eta_s()) + waiting,
            )
            return
        decile = 10 * snap.done // snap.total if snap.total else -1
        now = time.monotonic()
        if snap.finished:
            return
        if now - self.last_line >= self.interval_s or decile > self.last_decile >= 0:
            self.console.print(record(snap), markup=False, highlight=False)
            self.last_line = now
        self.last_decile = max(self.last_decile, decile)

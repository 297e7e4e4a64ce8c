"""Progress of a running batch: a rich bar on a terminal, one-line records when piped (cron,
systemd, CI logs), every ``IMAGEBATCH_PROGRESS_INTERVAL_S`` and at each 10 %. With
``IMAGEBATCH_LOG_FORMAT=json`` the records are JSON log records on stderr instead (never a
bar), with their numbers as fields."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jobs.clock import duration, now_iso
from worker.batch.snapshot import Snapshot
from worker.cli.output import json_logs, notice


def eta_text(seconds: float | None) -> str:
    return "ETA –" if seconds is None else f"ETA {duration(seconds)}"


def fields(snap: Snapshot, waiting_for_storage: bool = False) -> dict[str, Any]:
    """A progress record's numbers, for a JSON log."""
    counts = snap.breakdown()
    left = dict(zip(("waiting", "submitted", "storing"), counts, strict=True)) if counts else {}
    return {
        "done": snap.done,
        "total": snap.total,
        "succeeded": snap.succeeded,
        "failed": snap.failed,
        "rejected": snap.rejected,
        **left,
        "cost": dict(snap.money.by_currency),
        "projected": dict(snap.projected().by_currency),
        "eta_s": None if (eta := snap.eta_s()) is None else round(eta),
        "waiting_for_storage": waiting_for_storage,
    }


def record(snap: Snapshot, waiting_for_storage: bool = False) -> str:
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
        snap.pending(),
        *(job.describe() for job in snap.jobs),
        cost,
        eta_text(snap.eta_s()),
    ]
    if waiting_for_storage:
        parts.append("waiting for storage")
    return " · ".join(parts)


class Display:
    """Shows a batch's progress the way the output can take it."""

    def __init__(self, console: Console, interval_s: float) -> None:
        self.console = console
        self.as_json = json_logs()
        self.interactive = console.is_terminal and not self.as_json
        self.interval_s = interval_s
        self.last_line = 0.0
        self.last_decile = -1
        self.bar = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("· {task.fields[failed]} failed · {task.fields[cost]} · {task.fields[eta]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[jobs]}"),
            console=console,
            disable=not self.interactive,
        )
        self.task: Any = None
        self.waiting_for_storage = False
        self._seen: tuple[int, int] | None = None
        """(storage waits, succeeded) at the last update."""

    def __enter__(self) -> Display:
        self.bar.__enter__()
        self.task = self.bar.add_task("generating", total=None, failed=0, cost="", eta="", jobs="")
        self.last_line = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def storage_state(self, snap: Snapshot) -> bool:
        """Whether lines are waiting for the output store *now*. ``storage_waits`` only ever
        grows: new waits with no line stored since mean it is away; a line stored (and no new
        wait) means it is back. Both at once keep what was known."""
        seen = (snap.storage_waits, snap.succeeded)
        if self._seen is not None:
            waited = seen[0] > self._seen[0]
            stored = seen[1] > self._seen[1]
            if waited and not stored:
                self.waiting_for_storage = True
            elif stored and not waited:
                self.waiting_for_storage = False
        self._seen = seen
        return self.waiting_for_storage

    def update(self, snap: Snapshot) -> None:
        was_waiting = self.waiting_for_storage
        waiting = self.storage_state(snap)
        if self.interactive:
            projected = snap.projected()
            cost = snap.money.describe()
            if projected.by_currency and projected != snap.money:
                cost += f" of ~{projected.describe()}"
            self.bar.update(
                self.task,
                total=snap.total,
                completed=snap.done,
                failed=snap.failed + snap.rejected,
                cost=cost,
                eta=eta_text(snap.eta_s()) + (" · waiting for storage" if waiting else ""),
                jobs=" · ".join(job.describe() for job in snap.jobs),
            )
            return
        decile = 10 * snap.done // snap.total if snap.total else -1
        now = time.monotonic()
        if snap.finished:
            return
        # A log shows when storage went away and when it came back, not only at the interval.
        due = now - self.last_line >= self.interval_s or waiting != was_waiting
        if due or decile > self.last_decile >= 0:
            if self.as_json:
                notice(record(snap, waiting), event="progress", **fields(snap, waiting))
            else:
                self.console.print(record(snap, waiting), markup=False, highlight=False)
            self.last_line = now
        self.last_decile = max(self.last_decile, decile)

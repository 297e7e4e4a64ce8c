"""A batch's state at one moment, whatever it was read from (``worker.batch.status``): its
counts, money, the provider jobs it waits on, and what they mean: progress, what is pending,
the time it took and the ETA, the projected cost, the exit status ``run`` would give, and its
one line (``describe``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobs.pricing import Money
from worker.lines.groups import GroupRecord
from worker.lines.records import BatchStatus
from worker.redis.views import Window


@dataclass(frozen=True)
class JobView:
    """A group's provider job (an OpenAI batch) as ``status`` and the progress show it."""

    provider: str
    group: str
    lines: int
    status: str
    """The provider's word for the job (``in_progress``…), or the group's before it exists."""
    id: str = ""
    total: int = 0
    completed: int = 0
    failed: int = 0

    @classmethod
    def of(cls, rec: GroupRecord) -> JobView:
        return cls(
            rec.provider,
            rec.id,
            rec.size,
            rec.job_status or str(rec.status),
            rec.job_id,
            rec.total,
            rec.completed,
            rec.failed,
        )

    def describe(self) -> str:
        """``openai-batch batch_6f…: in_progress (requests: 120 completed, 2 failed of 300)``."""
        name = self.id or f"group {self.group}"
        text = f"{self.provider} {name}: {self.status}"
        if self.total:
            return text + (
                f" (requests: {self.completed} completed, {self.failed} failed of {self.total})"
            )
        return text + f" ({self.lines} lines)"


@dataclass(frozen=True)
class Snapshot:
    batch_id: str
    status: str
    total: int | None
    done: int
    succeeded: int
    failed: int
    rejected: int
    money: Money = field(default_factory=Money)
    started_at: str | None = None
    finished_at: str | None = None
    summary: dict[str, Any] | None = None
    out_uri: str | None = None
    stop_reason: str | None = None
    storage_waits: int = 0
    throttled: int = 0
    estimate: Money = field(default_factory=Money)
    jobs: tuple[JobView, ...] = ()
    """The provider jobs (OpenAI batches) of the batch's open groups."""
    source: str = "redis"
    """``redis`` (live) or ``store`` (what the output store recorded)."""
    recorded: str = ""
    """The status the record itself says: ``running`` in the store is a batch whose run has
    not written its end (still running elsewhere, or stopped without a word)."""
    window: Window | None = None
    """Where the unfinished lines in Redis wait (live snapshots only)."""
    providers: dict[str, str] = field(default_factory=dict)
    """The batch's providers that are not simply healthy: ``out: why`` (left the pool for
    good), ``cooling down until T``, ``probing``."""

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def running(self) -> bool:
        """Some process may still be buying or storing its lines."""
        return not self.finished and self.recorded in (
            BatchStatus.RUNNING,
            BatchStatus.STOPPING,
            BatchStatus.CANCELLED,
        )

    def progress(self) -> str:
        """``120/300 done``."""
        return f"{self.done}/{self.total if self.total is not None else '?'} done"

    @property
    def left(self) -> int:
        """Lines without a row yet."""
        return max(0, (self.total or 0) - self.done) if not self.finished else 0

    def breakdown(self) -> tuple[int, int, int] | None:
        """(waiting, submitted, storing) of the lines left: not yet submitted (in the window
        or still in the manifest), bought and being generated, images being stored."""
        if self.window is None or self.finished:
            return None
        submitted, storing = self.window.flight, self.window.store
        return max(0, self.left - submitted - storing), submitted, storing

    def pending(self) -> str:
        """``3 waiting · 4 submitted · 1 storing`` live, ``8 left`` from a record."""
        counts = self.breakdown()
        if counts is None:
            return f"{self.left} left"
        waiting, submitted, storing = counts
        return f"{waiting} waiting · {submitted} submitted · {storing} storing"

    def elapsed_s(self) -> float | None:
        if not self.started_at:
            return None
        started = datetime.fromisoformat(self.started_at.replace("Z", "+00:00")).timestamp()
        end = time.time()
        if self.finished_at:
            end = datetime.fromisoformat(self.finished_at.replace("Z", "+00:00")).timestamp()
        return max(0.0, end - started)

    def eta_s(self) -> float | None:
        elapsed = self.elapsed_s()
        bought = self.done - self.rejected
        left = (self.total or 0) - self.done
        if self.finished or not elapsed or bought <= 0 or left <= 0:
            return None
        return elapsed / bought * left

    def projected(self) -> Money:
        """What the whole batch will have cost: spent so far, plus the rest at the rate so far
        (the plan's estimate until a line has been paid for)."""
        bought = self.succeeded + self.failed
        remaining = max(0, (self.total or 0) - self.done)
        if self.finished or not bought or not self.money.by_currency:
            return self.money if self.finished or not self.estimate.by_currency else self.estimate
        scale = (bought + remaining) / bought
        return Money({k: round(v * scale, 6) for k, v in self.money.by_currency.items()})

    def exit_code(self) -> int:
        """As ``run`` would exit for this batch: 0 all succeeded, 1 some did not."""
        return 0 if self.failed == 0 and self.rejected == 0 else 1


def describe(snap: Snapshot) -> str:
    """One line: ``ID: state · 12/20 done · 10 succeeded · 1 failed · 1 rejected · 3 waiting
    · 4 submitted · 1 storing · 300 credits · ETA 41s · out s3://bucket/runs/ID``."""
    total = snap.total if snap.total is not None else "?"
    parts = [
        f"{snap.batch_id}: {snap.status}",
        f"{snap.done}/{total} done",
        f"{snap.succeeded} succeeded",
        f"{snap.failed} failed",
        f"{snap.rejected} rejected",
    ]
    if snap.left:
        parts.append(snap.pending())
    parts += [job.describe() for job in snap.jobs]
    parts.append(snap.money.describe())
    eta = snap.eta_s()
    if eta is not None:
        parts.append(f"ETA {eta:.0f}s")
    if snap.stop_reason:
        parts.append(f"stopped: {snap.stop_reason}")
    parts += [f"{name} {state}" for name, state in sorted(snap.providers.items())]
    if snap.out_uri:
        parts.append(f"out {snap.out_uri}")
    return " · ".join(parts)

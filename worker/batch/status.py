"""Where a batch stands, for progress bars, ``status`` and ``ls``: from Redis while it runs,
from the output store (``summary.json``, ``.state/batch.json``) after, so every batch has a
status, embedded runs included."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobs.errors import ImagebatchError
from jobs.output import groups, layout, results
from jobs.pricing import Money
from jobs.routing import is_pool, members
from jobs.storage import Store
from worker.lines.groups import GroupRecord
from worker.lines.records import BatchStatus
from worker.redis.state import State
from worker.redis.views import Window

log = logging.getLogger(__name__)


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


def from_redis(state: State, batch: str) -> Snapshot | None:
    meta = state.batch(batch)
    if not meta:
        return None
    summary = json.loads(meta["summary"]) if meta.get("summary") else None
    if summary is not None:
        return from_summary(summary, meta.get("status", BatchStatus.FINISHED), "redis")
    counts = state.counters(batch)
    window = state.window(batch)
    money = Money(
        {k.removeprefix("credits:"): v for k, v in counts.items() if k.startswith("credits:")}
    )
    total = meta.get("total")
    return Snapshot(
        batch,
        meta.get("status", BatchStatus.RUNNING),
        int(total) if total else None,
        int(counts.get("done", 0)),
        int(counts.get("succeeded", 0)),
        int(counts.get("failed", 0)),
        int(counts.get("rejected", 0)),
        money,
        started_at=meta.get("started_at"),
        out_uri=meta.get("out_uri"),
        stop_reason=meta.get("stop_reason") or None,
        storage_waits=int(counts.get("storage_waits", 0)),
        throttled=int(counts.get("throttled", 0)),
        estimate=Money(json.loads(meta.get("estimate") or "{}")),
        recorded=meta.get("status", BatchStatus.RUNNING),
        window=window,
        providers=_providers(state, batch, meta),
        jobs=tuple(JobView.of(rec) for rec in state.groups.of_batch(batch)),
    )


def _providers(state: State, batch: str, meta: dict[str, str]) -> dict[str, str]:
    """Each of the batch's pool members that left it or is cooling down, saying so."""
    found = {name: f"out: {why}" for name, why in state.out_of_pool(batch).items()}
    spec, keyed = meta.get("provider", ""), meta.get("keyed", "")
    pool = members(spec, tuple(keyed.split(","))) if is_pool(spec) and keyed else None
    now = time.time()
    for name in pool or ():
        health = state.health(name)
        if name not in found and health.until:
            found[name] = health.describe(now)
    return found


def from_summary(summary: dict[str, Any], status: str, source: str) -> Snapshot:
    return Snapshot(
        summary["batch_id"],
        status,
        summary["total"],
        summary["total"],
        summary["succeeded"],
        summary["failed"],
        summary["rejected"],
        Money(summary.get("costs") or {}),
        started_at=summary.get("started_at"),
        finished_at=summary.get("finished_at"),
        summary=summary,
        out_uri=summary.get("out"),
        stop_reason=summary.get("stop_reason"),
        source=source,
        providers={k: f"out: {v}" for k, v in (summary.get("providers_left") or {}).items()},
    )


def from_store(store: Store, batch: str) -> Snapshot | None:
    """A batch Redis no longer knows (an embedded run, or one finished long ago)."""
    summary = results.read_json(store, layout.summary_key(batch))
    if summary is not None:
        return from_summary(summary, BatchStatus.FINISHED, "store")
    info = results.read_json(store, layout.info_key(batch))
    if info is None:
        return None
    raw = info.get("counters")
    counts = {str(k): _number(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    money = Money(
        {
            k.removeprefix("credits:"): v
            for k, v in counts.items()
            if k.startswith("credits:") and v is not None
        }
    )
    recorded = status = str(info.get("status") or BatchStatus.RUNNING)
    if status == BatchStatus.RUNNING:
        status = "stopped"  # no live record: nothing is running it now; the same command resumes
    total = _number(info.get("total"))

    def count(name: str) -> int:
        return int(counts.get(name) or 0)

    return Snapshot(
        batch,
        status,
        None if total is None else int(total),
        count("done"),
        count("succeeded"),
        count("failed"),
        count("rejected"),
        money,
        started_at=_text(info.get("started_at")),
        out_uri=_text(info.get("out_uri")),
        jobs=tuple(_open_jobs(store, batch)),
        source="store",
        recorded=recorded,
    )


def _number(value: object) -> float | None:
    """A count as any version wrote it: a number, or (before numbers were written as numbers,
    by an interrupted or running batch) its text; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _open_jobs(store: Store, batch: str) -> Iterator[JobView]:
    """The provider jobs an unfinished batch left running, as the output store last saw
    them (an interrupted embedded run's OpenAI batches run on)."""
    for record in groups.records(store, batch):
        if record.status != "collected" and record.job_id:
            counts = record.counts
            yield JobView(
                record.provider,
                record.group,
                len(record.members),
                record.status,
                record.job_id,
                int(counts.get("total", 0)),
                int(counts.get("completed", 0)),
                int(counts.get("failed", 0)),
            )


def listing(store: Store) -> Iterator[Snapshot]:
    """Every batch under an output location, newest first; a record that cannot be read is
    left out, never the reason the others are not listed."""
    found = []
    for name in store.list_children(""):
        try:
            snap = from_store(store, name)
            if snap is not None:
                describe(snap)  # what ls prints must be printable
        except (ValueError, KeyError, TypeError, AttributeError, ImagebatchError) as exc:
            log.debug("ls: skipping %s: %s", name, exc)
            continue  # a folder that is not a batch, or a record we cannot read
        if snap is not None:
            found.append(snap)
    yield from sorted(found, key=lambda s: s.started_at or "", reverse=True)


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

"""Where a batch stands, read from Redis while it runs and from the output store
(``summary.json``, ``.state/batch.json``) after, so every batch has a status, embedded runs
included: a ``snapshot.Snapshot`` for progress bars, ``status`` and ``ls``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from jobs.errors import ImagebatchError
from jobs.output import groups, layout, results
from jobs.pricing import Money
from jobs.routing import is_pool, members
from jobs.storage import Store
from worker.batch.snapshot import JobView, Snapshot, describe
from worker.lines.records import BatchStatus
from worker.redis.state import State

log = logging.getLogger(__name__)


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

"""A batch's life after enqueueing: progress snapshots, cancel, and finalize.

Finalize runs once, when the atomic done-counter reaches the line count (no chord over the
whole batch): it streams the rows into results.jsonl, writes summary.json, and then removes
every per-line key, leaving only the batch record with its summary for ``imagebatch status``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jobs import results
from worker.pipeline import now_iso
from worker.runtime import Runtime


@dataclass(frozen=True)
class Snapshot:
    """Where a batch stands, for progress bars and ``imagebatch status``."""

    batch_id: str
    status: str
    total: int | None
    done: int
    succeeded: int
    failed: int
    rejected: int
    credits: float
    credit_unit: str
    started_at: str | None
    summary: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def eta_s(self) -> float | None:
        if not self.total or not self.done or not self.started_at or self.finished:
            return None
        started = datetime.fromisoformat(self.started_at.replace("Z", "+00:00")).timestamp()
        elapsed = time.time() - started
        return elapsed / self.done * (self.total - self.done)


def snapshot(rt: Runtime, batch: str) -> Snapshot | None:
    meta = rt.state.meta(batch)
    if not meta:
        return None
    summary = json.loads(meta["summary"]) if meta.get("summary") else None
    if summary is not None:
        return Snapshot(
            batch,
            meta.get("status", "finished"),
            summary["total"],
            summary["total"],
            summary["succeeded"],
            summary["failed"],
            summary["rejected"],
            summary["credits"],
            summary["credit_unit"],
            summary["started_at"],
            summary,
        )
    counts = rt.state.counts(batch)
    total = meta.get("total")
    return Snapshot(
        batch,
        meta.get("status", "running"),
        int(total) if total else None,
        int(counts.get("done", 0)),
        int(counts.get("succeeded", 0)),
        int(counts.get("failed", 0)),
        int(counts.get("rejected", 0)),
        round(counts.get("credits", 0.0), 6),
        meta.get("credit_unit", "credits"),
        meta.get("started_at"),
        None,
    )


def cancel(rt: Runtime, batch: str) -> bool:
    """Stop new submits: lines not yet submitted end ``failed`` (cancelled); paid jobs finish."""
    if not rt.state.meta(batch):
        return False
    rt.state.set_meta(batch, status="cancelled")
    return True


def finalize(rt: Runtime, batch: str) -> dict[str, Any] | None:
    """Write results.jsonl and summary.json once all lines are done; idempotent."""
    state = rt.state
    meta = state.meta(batch)
    if not meta or meta.get("summary") or not meta.get("total"):
        return None
    total = int(meta["total"])
    counts = state.counts(batch)
    if int(counts.get("done", 0)) < total:
        return None
    if not state.r.set(f"ib:{batch}:finalizing", "1", nx=True, ex=600):
        return None
    store = rt.store(meta["out"])
    try:
        tally = results.write_results(store, batch, _complete(state.rows(batch, total)))
    except BaseException:
        state.r.delete(f"ib:{batch}:finalizing")
        raise
    summary = {
        "batch_id": batch,
        "total": tally.total,
        "succeeded": tally.by_status["succeeded"],
        "failed": tally.by_status["failed"],
        "rejected": tally.by_status["rejected"],
        "credits": round(tally.credits, 6),
        "credit_unit": meta.get("credit_unit", "credits"),
        "estimated_credits": float(meta.get("estimate", 0)),
        "submit_requests": int(counts.get("submit_requests", 0)),
        "jobs_accepted": int(counts.get("jobs_accepted", 0)),
        "ambiguous_submits": int(counts.get("ambiguous_submits", 0)),
        "rebought_after_expiry": int(counts.get("rebought_after_expiry", 0)),
        "stop_reason": meta.get("stop_reason") or None,
        "started_at": meta.get("started_at"),
        "finished_at": now_iso(),
        "results_uri": store.uri(results.results_key(batch)),
    }
    results.write_summary(store, batch, summary)
    state.set_meta(batch, status="finished", summary=summary, finished_at=summary["finished_at"])
    state.purge(batch)
    state.deactivate(batch)
    state.r.expire(state.meta_key(batch), rt.settings.result_ttl_s)
    return summary


def _complete(rows: Iterator[str | None]) -> Iterator[str]:
    for idx, row in enumerate(rows):
        if row is None:
            raise RuntimeError(f"line index {idx} has no result row; not finalizing")
        yield row

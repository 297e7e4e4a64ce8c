"""A batch after its lines start ending: writing their rows to part files (flush), failing the
lines a stop left unbought (drain), and finalize: results.jsonl, failed.jsonl, summary.json,
report.html, the notification, and Redis emptied of the batch but for its summary.

Finalize runs once, when the done counter reaches the line count (no chord over the batch).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

from jobs.clock import now_iso
from jobs.manifest.backlog import Stored
from jobs.output import groups, layout, parts, report, results, reuse
from jobs.output.batch_info import elapsed_s, write_info
from jobs.pricing import Money, in_usd
from jobs.routing import is_pool
from worker.lines.records import BatchStatus
from worker.redis import keys
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def flush(rt: Runtime, batch: str, *, most: int = 20_000) -> int:
    """Write finished rows into their chunks' part files, then drop them from Redis.

    The part file is written before the rows leave Redis: a crash between the two writes the
    same rows again next time, which changes nothing."""
    state = rt.state
    lock = state.lock(keys.lock(batch, "flush"), timeout=300)
    if not lock.acquire(blocking=True, blocking_timeout=30):
        return 0
    try:
        meta = state.batch(batch)
        if not meta:
            return 0
        chunk_lines = int(meta.get("chunk_lines", rt.settings.chunk_lines))
        store = rt.store(meta["out"])
        written = 0
        while True:
            pending = state.pending_rows(batch, most)
            if not pending:
                break
            by_chunk: dict[int, dict[int, str]] = defaultdict(dict)
            for text in pending:
                idx, row = parts.parse_entry(text)
                by_chunk[idx // chunk_lines][idx] = row
            for chunk, rows in sorted(by_chunk.items()):
                reuse.record(store, batch, chunk, rows)
            state.drop_rows(batch, len(pending))
            written += len(pending)
            if len(pending) < most:
                break
        # Every flush (and the one after Ctrl-C) saves the counters and the time worked, so a
        # run that crashes or is interrupted still counts in the next run's summary.
        write_info(store, batch, meta, state.counters(batch))
        return written
    finally:
        lock.release()


def finalize(rt: Runtime, batch: str) -> dict[str, Any] | None:
    """Write results.jsonl, failed.jsonl, summary.json and report.html once every line is
    done; idempotent (a second call finds the summary and does nothing)."""
    state = rt.state
    meta = state.batch(batch)
    if not meta or meta.get("status") == BatchStatus.FINISHED or "total" not in meta:
        return None
    total = int(meta["total"])
    if int(state.counters(batch).get("done", 0)) < total:
        return None
    lock = state.lock(keys.lock(batch, "finalize"), timeout=1800)
    if not lock.acquire(blocking=False):
        return None
    try:
        flush(rt, batch)
        counts = state.counters(batch)
        store = rt.store(meta["out"])
        settings = rt.settings
        units = {
            name: settings.provider_spec(name).credit_unit for name in settings.provider_names()
        }
        tally = results.write_results(
            store,
            batch,
            parts.rows_in_order(store, batch),
            Stored(store, layout.manifest_key(batch)),
            units,
            total,
        )
        summary = _summary(rt, meta, counts, tally)
        results.write_json(store, layout.summary_key(batch), summary)
        _report(rt, batch, summary)
        state.set_batch(
            batch,
            status=BatchStatus.FINISHED,
            summary=json.dumps(summary),
            finished_at=summary["finished_at"],
        )
        write_info(store, batch, {**meta, "status": BatchStatus.FINISHED}, counts)
        info = results.read_json(store, layout.info_key(batch)) or {}
        info["summary"] = summary
        info["elapsed_s"] = summary["elapsed_s"]
        results.write_json(store, layout.info_key(batch), info)
        state.purge(batch)
        state.expire_record(batch, rt.settings.result_ttl_s)
        _notify(rt, summary)
        return summary
    finally:
        try:
            lock.release()
        except Exception:  # the lock's TTL ends it anyway
            log.debug("finalize lock already gone", exc_info=True)


def _summary(
    rt: Runtime, meta: dict[str, str], counts: dict[str, float], tally: results.Tally
) -> dict[str, Any]:
    money: Money = tally.money
    units = {name: part.unit for name, part in tally.by_provider.items()}
    if len(money.by_currency) > 1:
        credits, unit = None, "mixed"
    elif money.by_currency:
        ((name, credits),) = money.by_currency.items()
        unit = "USD" if name == "USD" else "credits"
    else:
        spec = meta["provider"]
        credits = 0.0
        unit = "USD" if is_pool(spec) else rt.settings.provider_spec(spec).credit_unit
    stop_reason = meta.get("stop_reason") or (
        "cancelled" if meta.get("status") == BatchStatus.CANCELLED else None
    )
    # Counted from the groups saved in the output store: exact across crashes and resumes.
    jobs_used, jobs_refused = groups.jobs_used(rt.store(meta["out"]), meta["batch_id"])
    return {
        "batch_id": meta["batch_id"],
        "total": tally.total,
        "succeeded": tally.by_status.get("succeeded", 0),
        "failed": tally.by_status.get("failed", 0),
        "rejected": tally.by_status.get("rejected", 0),
        "reused": tally.reused,
        "credits": credits,
        "credit_unit": unit,
        "costs": dict(money.by_currency),
        "usd": money.in_usd(rt.settings.usd_rates()),
        "by_provider": {
            name: {
                "lines": part.lines,
                "images": part.images,
                "credits": round(part.credits, 6),
                "unit": part.unit,
                "usd": in_usd(part.credits, part.unit, rt.settings.usd_per_credit(name)),
            }
            for name, part in sorted(tally.by_provider.items())
        },
        "providers_left": rt.state.out_of_pool(meta["batch_id"]),
        "moved": int(counts.get("moved", 0)),
        "ambiguous_moved": int(counts.get("ambiguous_moved", 0)),
        "credit_units": units,
        "failures": dict(sorted(tally.failures.items())),
        "estimated": json.loads(meta.get("estimate") or "{}"),
        "submit_requests": int(counts.get("submit_requests", 0)),
        "jobs_accepted": int(counts.get("jobs_accepted", 0)),
        "ambiguous_submits": int(counts.get("ambiguous_submits", 0)),
        "rebought_after_expiry": int(counts.get("rebought_after_expiry", 0)),
        "polls": int(counts.get("polls", 0)),
        "throttled": int(counts.get("throttled", 0)),
        "webhooks": int(counts.get("webhooks", 0)),
        "openai_batches": jobs_used,
        "openai_batches_refused": jobs_refused,
        "stop_reason": stop_reason,
        "runs": int(meta.get("runs", 1)),
        "out": meta.get("out_uri"),
        "started_at": meta.get("started_at"),
        "finished_at": meta.get("finished_before") or now_iso(),
        "elapsed_s": elapsed_s(meta),
        "results_uri": rt.store(meta["out"]).uri(layout.results_key(meta["batch_id"])),
    }


def _report(rt: Runtime, batch: str, summary: dict[str, Any]) -> None:
    """report.html is for people: a failure to draw it never fails the batch."""
    store = rt.store(rt.state.batch(batch)["out"])
    try:
        report.rebuild(store, batch, summary, previews=rt.settings.report_previews)
    except Exception:
        log.exception("batch %s: report.html could not be written", batch)


def _notify(rt: Runtime, summary: dict[str, Any]) -> None:
    if not rt.settings.notify_url:
        return
    from worker.batch import notify

    notify.send_later(rt.settings, summary)

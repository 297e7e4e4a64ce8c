"""The one place a step's decision takes effect, whichever path it came by (the runner, the
drain of a stopped batch, a webhook): the transition is applied atomically in Redis
(``apply.lua``), then logged per line, counted by the process's observers (metrics), and
acted on: a 429 slows its provider for every worker, a failing submit counts toward its
breaker, a 402/401/403 stops the batch (or takes the provider out of a pool).

So a line finished by a webhook is logged and counted exactly like one finished by a poll.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace

from jobs.pricing import in_usd
from jobs.registry import REGISTRY
from worker.lines.records import TABLE, BatchStatus, LineRecord, LineStatus, Transition
from worker.redis.line_state import Applied
from worker.redis.pools import Breaker
from worker.runtime import Runtime

log = logging.getLogger("imagebatch.lines")


def apply(
    rt: Runtime,
    rec: LineRecord,
    t: Transition,
    *,
    meta: Mapping[str, str],
    seconds: float | None = None,
    index_jobs: bool | None = None,
) -> Applied:
    """Apply ``t`` to ``rec`` if the line is still where the step found it, with its counts
    (in one script: a finalize never reads a batch's counters without them), then log, observe
    and act on it. ``seconds`` is how long the step took."""
    state = rt.state
    t = _priced(rt, rec, t)
    drop: list[str] = []
    if TABLE[t.status].terminal or t.status is LineStatus.READY:
        drop = [spec["blob"] for spec in rec.artifacts if "blob" in spec]
    applied = state.apply(
        rec,
        t,
        model=rec.request.model,
        index_jobs=rt.webhooks_on if index_jobs is None else index_jobs,
        drop_keys=drop,
        total=int(meta.get("total", -1)),
    )
    if not applied.applied:
        return applied
    held = t.status is LineStatus.READY and t.outcome == "held"  # steps: batch interrupted
    if held and state.batch_status(rec.batch) != BatchStatus.INTERRUPTED:
        # A hold decided on a record read before a resume landed after the resume released
        # the window (it sets the status first, then releases): release this line too.
        state.release(rec, time.time())
    _log(rec, t)
    rt.observe(rec, t, seconds)
    _act(rt, rec, t, meta)
    return applied


def _priced(rt: Runtime, rec: LineRecord, t: Transition) -> Transition:
    """The transition with its row's cost in USD too (when the credit's price is known)."""
    if t.row is None or not t.row.credits:
        return t
    unit = REGISTRY[rec.provider].credit_unit
    usd = in_usd(t.row.credits, unit, rt.settings.usd_per_credit(rec.provider))
    return replace(t, row=t.row.model_copy(update={"usd": usd}))


def _log(rec: LineRecord, t: Transition) -> None:
    """One log record per applied transition, with the line's batch, id, job, provider, step."""
    outcome = t.outcome or t.status.value
    log.log(
        logging.WARNING if t.status is LineStatus.FAILED else logging.INFO,
        "line %s: %s%s",
        rec.id,
        outcome,
        f": {t.detail}" if t.detail else "",
        extra={
            "batch": rec.batch,
            "line_id": rec.id,
            "job_id": str(t.changes.get("job_id") or rec.job_id) or None,
            "provider": rec.provider,
            "step": str(rec.info.step or ""),
            "outcome": outcome,
        },
    )


def _act(rt: Runtime, rec: LineRecord, t: Transition, meta: Mapping[str, str]) -> None:
    """What the transition says beyond its line: a 429 for the provider's limits, a submit's
    answer for its breaker, a provider leaving the pool, the batch stopping."""
    state = rt.state
    if t.limit is not None:
        cap = None
        if t.limit.kind == "concurrency":
            # The provider runs all it allows of ours: what we have in flight (this line has
            # just left), or the limit it names if that is smaller.
            cap = state.in_flight(rec.provider)
            if t.limit.named_limit is not None:
                cap = min(cap, t.limit.named_limit)
        state.note_429(rec.provider, str(t.limit.request), cap=cap, retry_after=t.limit.retry_after)
    if t.answered is not None:
        _verdict(rt, rec.provider, t.answered)
    if t.leave is not None and state.leave_pool(rec.batch, *t.leave):
        provider, why = t.leave
        log.warning(
            "batch %s: %s left the batch's pool: %s",
            rec.batch,
            provider,
            why,
            extra={"batch": rec.batch, "provider": provider, "outcome": "left the pool"},
        )
    if t.stop is not None and meta.get("status", BatchStatus.RUNNING) == BatchStatus.RUNNING:
        reason, message = t.stop
        state.set_batch(
            rec.batch, status=BatchStatus.STOPPING, stop_reason=reason, stop_message=message
        )
        state.wake("stop")


def _verdict(rt: Runtime, provider: str, answered: bool) -> None:
    """Count a submit toward the provider's breaker; say when it starts or ends a cooldown."""
    settings = rt.settings
    breaker = Breaker(
        settings.breaker_failures, settings.breaker_cooldown_s, settings.breaker_max_s
    )
    change = rt.state.verdict(provider, answered, time.time(), breaker)
    if change.startswith("cooling"):
        until = time.strftime("%H:%M:%S", time.localtime(float(change.split()[1])))
        log.warning(
            "%s keeps failing: no submits to it until %s, then one probe line",
            provider,
            until,
            extra={"provider": provider, "outcome": "cooling down"},
        )
    elif change == "healthy":
        log.info("%s answers again", provider, extra={"provider": provider, "outcome": "healthy"})
        rt.state.wake("limit")

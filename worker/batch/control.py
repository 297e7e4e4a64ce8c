"""Stopping a batch on purpose: Ctrl-C of the run that owns it (interrupt), ``imagebatch
cancel``, and the drain that ends a stopped batch's unbought lines at once."""

from __future__ import annotations

import time

from worker import transitions
from worker.lines.endings import fail, stopped_error
from worker.lines.records import BatchStatus, LineRecord, LineStatus
from worker.runtime import Runtime


def drain(rt: Runtime, batch: str) -> int:
    """A stopped or cancelled batch: its READY lines (waiting for a slot) end now, failed
    with the reason, instead of waiting for slots only to be refused."""
    state = rt.state
    meta = state.batch(batch)
    if not meta or meta.get("status") == BatchStatus.RUNNING:
        return 0
    ended = 0
    for rec in list(state.lines(batch)):
        if rec.status is not LineStatus.READY:
            continue
        t = fail(rec, stopped_error(meta), outcome="drained")
        if transitions.apply(rt, rec, t, meta=meta).applied:
            ended += 1
    return ended


def interrupt(rt: Runtime, batch: str, owner: str) -> bool:
    """Ctrl-C on the ``run`` that owns the batch: no new submits; lines already bought go on
    and land. Only the owner's token interrupts: a run that attached to a batch another
    process runs (a fleet's, another terminal's) must not stop it; False then."""
    return rt.state.set_batch_if(batch, "owner", owner, status=BatchStatus.INTERRUPTED)


def cancel(rt: Runtime, batch: str) -> bool:
    """Stop new submits: lines not yet submitted end ``failed`` (cancelled); paid jobs finish."""
    meta = rt.state.batch(batch)
    if not meta or meta.get("status") == BatchStatus.FINISHED:
        return False
    rt.state.set_batch(
        batch,
        status=BatchStatus.CANCELLED,
        stop_reason="cancelled",
        stop_message="the batch was cancelled",
    )
    # Its groups act now: a job running at the provider (an OpenAI batch) is cancelled, and
    # what it finished is stored; a group not yet created ends its lines.
    rt.state.groups.due_now(batch, time.time())
    rt.state.wake("stop")
    return True


def in_flight(rt: Runtime, batch: str) -> list[LineRecord]:
    """The batch's lines that were bought and are not stored yet, but those waiting in a
    group's job (an OpenAI batch runs on for hours: an interrupted run does not wait for it,
    and the same command picks it up)."""
    waiting = (LineStatus.READY, LineStatus.GROUPED)
    return [rec for rec in rt.state.lines(batch) if rec.status not in waiting]


def open_jobs(rt: Runtime, batch: str) -> list[str]:
    """The provider jobs (OpenAI batches) of the batch's open groups, as ``id (status)``."""
    return [
        f"{g.job_id} ({g.job_status or g.status})"
        for g in rt.state.groups.of_batch(batch)
        if g.job_id
    ]

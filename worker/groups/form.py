"""The scheduler's part for a group provider: form groups out of READY lines and dispatch
each group's step when it is due (a send, a create, a poll minutes apart, a collect).

A group is formed when a batch has a full group of due lines, or when no more lines will
come soon (the manifest is all admitted, the window is full, or the feeder has added none
for ``SETTLE_S``), within the provider's cap of lines in open groups
(``IMAGEBATCH_<NAME>_MAX_IN_FLIGHT``). Only the scheduler's leader forms groups.
"""

from __future__ import annotations

import time
import uuid
from typing import Protocol

from jobs.registry import REGISTRY
from worker.lines.records import BatchStatus
from worker.runtime import Runtime

SETTLE_S = 2.0
"""Due lines short of a full group wait this long after the feeder's last admission."""
IDLE_S = 1.0
MOST_PER_PASS = 64
"""Groups dispatched per pass at most (each step is one task)."""


class GroupSender(Protocol):
    """How a group's step becomes a task (``worker.celery.tasks.CeleryDispatch``)."""

    def group(self, batch: str, group: str, seq: int) -> None: ...


def new_id() -> str:
    """Unique across runs and Redis wipes: a job is found again by the group's id."""
    return uuid.uuid4().hex[:12]


class GroupDispatch:
    """Forms and dispatches the groups of every group provider."""

    def __init__(self, rt: Runtime, sender: GroupSender) -> None:
        self.rt, self.sender = rt, sender

    @staticmethod
    def handles(provider: str) -> bool:
        spec = REGISTRY.get(provider)
        return spec is not None and spec.group

    def pump(self, provider: str, now: float | None = None) -> float:
        """Form what is ready, dispatch what is due; returns how long nothing needs doing."""
        now = time.time() if now is None else now
        waits = [IDLE_S]
        settling = self.form(provider, now)
        if settling is not None:
            waits.append(settling)
        claimed, nxt = self.rt.state.groups.claim(
            provider, now, self.rt.settings.lease_s, MOST_PER_PASS
        )
        for batch, group, seq in claimed:
            self.sender.group(batch, group, seq)
        if nxt is not None:
            waits.append(nxt - now)
        return max(0.05, min(waits))

    def form(self, provider: str, now: float) -> float | None:
        """Form every group that is ready; returns when lines still settling may be, if any."""
        state, settings = self.rt.state, self.rt.settings
        config = settings.group_config(provider)
        room = settings.provider_config(provider).max_in_flight
        room -= state.groups.lines_in_groups(provider)
        settling: float | None = None
        for batch in state.groups.queued_batches(provider):
            meta = self.rt.batch_meta(batch)
            if not meta or meta.get("status", BatchStatus.RUNNING) != BatchStatus.RUNNING:
                continue
            while room > 0:
                due, newest = state.groups.ready_due(batch, provider, now)
                if not due:
                    break
                size = min(config.size, room)
                if due < size and not self._no_more_soon(batch, meta):
                    wait = SETTLE_S - (now - (newest or now))
                    if wait > 0:
                        settling = wait if settling is None else min(settling, wait)
                        break
                taken = state.groups.form(batch, provider, new_id(), size, config.max_bytes, now)
                if not taken:
                    break
                room -= taken
        return settling

    def _no_more_soon(self, batch: str, meta: dict[str, str]) -> bool:
        """The feeder will admit no line soon: all are admitted, or the window is full."""
        if int(meta.get("cursor_idx", 0)) >= int(meta.get("total", 0)):
            return True
        done = int(self.rt.state.counters(batch).get("done", 0))
        return int(meta.get("admitted", 0)) - done >= int(meta.get("window", 0))

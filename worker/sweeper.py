"""Self-healing for unattended runs: re-send steps whose message was lost.

Every scheduled step leaves a due time in ``ib:B:due``. A message can still vanish (a worker
killed between releasing a line and queueing its next step, a broker restart without
persistence, a missed wake-up of a parked line); the sweeper finds lines overdue by more
than a grace period, not leased by any task, and queues their step again under a new seq,
so any late original copy is dropped as stale. It also finalizes a batch whose last line
finished but whose finalize message was lost. One sweeper runs at a time across all workers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from worker.pipeline import STEP_FOR_STATUS, Next, Send
from worker.runtime import Runtime
from worker.state import TERMINAL

log = logging.getLogger(__name__)


def sweep(rt: Runtime, send: Send, finalize: Callable[[str], None]) -> int:
    """One pass over every active batch; returns how many steps were re-sent."""
    state, settings = rt.state, rt.settings
    if not state.r.set("ib:sweeping", "1", nx=True, ex=max(1, int(settings.sweep_interval_s))):
        return 0
    resent = 0
    for batch in state.active():
        meta = state.meta(batch)
        if not meta or meta.get("summary"):
            state.deactivate(batch)
            continue
        for idx in state.overdue(batch, settings.sweep_grace_s):
            item = state.item(batch, idx)
            if not item or item.get("status") in TERMINAL:
                state.r.zrem(f"ib:{batch}:due", str(idx))
                continue
            if state.lease_left(batch, idx) > 0:
                continue
            seq = state.next_seq(batch, idx)
            state.schedule(batch, idx, 0)
            send(batch, idx, Next(STEP_FOR_STATUS[item["status"]], 0.0, seq))
            resent += 1
        total = meta.get("total")
        if total and int(state.counts(batch).get("done", 0)) >= int(total):
            finalize(batch)
    if resent:
        log.warning("sweeper re-sent %d overdue steps", resent)
    return resent


class Sweeper(threading.Thread):
    """Runs ``sweep`` every ``sweep_interval_s`` until stopped (a daemon thread per worker)."""

    def __init__(self, rt: Runtime, send: Send, finalize: Callable[[str], None]) -> None:
        super().__init__(name="imagebatch-sweeper", daemon=True)
        self.rt, self.send, self.finalize = rt, send, finalize
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.rt.settings.sweep_interval_s):
            try:
                sweep(self.rt, self.send, self.finalize)
            except Exception:  # a sweep that fails is retried next interval
                log.exception("sweep failed")

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)

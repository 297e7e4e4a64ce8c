"""Run a dispatched step for a group of lines: claim each line, let its step decide, apply the
transition, and carry on in the same task when the next step is due at once (the worker that
sees a job finish stores its images, and no message is sent for that).

The step that runs is the one the line's status needs (``records.TABLE``), whatever the task
was called: a poll dispatched for a line whose submit died with its worker re-runs the submit.
A line whose seq moved on since dispatch is a stale copy and is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from jobs.errors import ImagebatchError
from worker import steps
from worker.records import TABLE, BatchStatus, LineRecord, LineStatus, Step, Transition
from worker.runtime import Runtime
from worker.state import home_key

log = logging.getLogger("imagebatch.lines")

STEP_FUNCTIONS: dict[Step, Callable[[steps.Context, LineRecord], Transition]] = {
    Step.SUBMIT: steps.submit,
    Step.POLL: steps.poll,
    Step.STORE: steps.store,
}
CLAIMED_STEPS = frozenset({Step.SUBMIT, Step.STORE})
"""Steps a second copy must never run at the same time (a paid POST, an upload)."""


@dataclass
class Report:
    """What one task did, for its Celery result (Flower shows it) and for logs."""

    outcomes: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)

    def as_result(self) -> dict[str, object]:
        return {"outcomes": dict(self.outcomes), "failed": self.failed}


class Heartbeat(threading.Thread):
    """Keeps the leases of the steps running in this process alive, so a slow provider call
    is not taken for a dead worker, while a really dead worker's lines are taken over soon."""

    def __init__(self, rt: Runtime, host: str) -> None:
        super().__init__(name="imagebatch-heartbeat", daemon=True)
        self.rt, self.host = rt, host
        self.running: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    @contextmanager
    def holding(self, zset: str, member: str) -> Iterator[None]:
        entry = (zset, member)
        with self.lock:
            self.running[entry] = self.running.get(entry, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.running[entry] -= 1
                if not self.running[entry]:
                    del self.running[entry]

    def beat(self) -> None:
        lease = self.rt.settings.lease_s
        with self.lock:
            entries = list(self.running)
        if entries:
            self.rt.state.renew(entries, time.time() + lease)
        self.rt.state.worker_alive(self.host, ttl=max(30.0, 3 * lease))

    def run(self) -> None:
        while not self.stopped.wait(self.rt.settings.lease_s / 3):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next beat tries again
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()


class Runner:
    """Runs steps for one task. ``on_last(batch)`` is called when a batch's last line ends."""

    def __init__(
        self,
        rt: Runtime,
        on_last: Callable[[str], None],
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.rt = rt
        self.on_last = on_last
        self.heartbeat = heartbeat

    def run(self, dispatched: Step, batch: str, lines: Sequence[tuple[int, int]]) -> Report:
        report = Report()
        meta = self.rt.state.batch(batch)
        if not meta:
            return report
        for idx, seq in lines:
            try:
                self._one(dispatched, batch, meta, idx, seq, report)
            except ImagebatchError as exc:
                # Only infrastructure (Redis, the store's setup) gets here: the line's lease
                # runs out and the scheduler dispatches it again.
                log.warning("line %s/%s: %s; it will be taken up again", batch, idx, exc.message)
                report.outcomes["deferred"] += 1
        return report

    def _one(
        self, dispatched: Step, batch: str, meta: dict[str, str], idx: int, seq: int, report: Report
    ) -> None:
        state = self.rt.state
        owner = f"{seq}:{uuid.uuid4().hex[:12]}"
        rec = (
            state.begin(batch, idx, seq, owner)
            if dispatched in CLAIMED_STEPS
            else state.read(batch, idx)
        )
        if rec is None or rec.seq != seq or rec.info.terminal:
            report.outcomes["stale"] += 1
            return
        step = rec.info.step
        assert step is not None
        if step in CLAIMED_STEPS and dispatched not in CLAIMED_STEPS:
            rec = state.begin(batch, idx, seq, owner)
            if rec is None:
                report.outcomes["stale"] += 1
                return
        ctx = self.rt.context(meta)
        if rec.starts > self.rt.settings.max_deliveries:
            poison = ImagebatchError(
                f"the line's {step} step was started {rec.starts - 1} times without finishing "
                "(its worker kept dying)",
                type="poison",
            )
            self._apply(ctx, rec, steps.fail(ctx, rec, poison), report)
            return
        while True:
            with self._held(rec):
                t = STEP_FUNCTIONS[step](ctx, rec)
            inline = t.status is LineStatus.FETCHED and t.due_in == 0
            if inline:
                # Stored right here: the line is ours for a lease, like any dispatched step.
                t = replace(t, due_in=self.rt.settings.lease_s)
            if not self._apply(ctx, rec, t, report) or not inline:
                return
            # The images are ready now: store them in this task, with the bytes in hand.
            rec = rec.evolve(status=t.status, settled=rec.seq, owner="", **t.changes)
            step = Step.STORE

    @contextmanager
    def _held(self, rec: LineRecord) -> Iterator[None]:
        if self.heartbeat is None:
            yield
            return
        with self.heartbeat.holding(home_key(rec.info.home, rec.provider), rec.member):
            yield

    def _apply(self, ctx: steps.Context, rec: LineRecord, t: Transition, report: Report) -> bool:
        state = self.rt.state
        drop: list[str] = []
        if TABLE[t.status].terminal or t.status is LineStatus.READY:
            drop = [spec["blob"] for spec in rec.artifacts if "blob" in spec]
        applied = state.apply(
            rec,
            t,
            model=rec.request.model,
            index_jobs=self.rt.webhooks_on,
            drop_keys=drop,
        )
        if not applied.applied:
            report.outcomes["stale"] += 1
            return False
        report.outcomes[t.outcome or t.status.value] += 1
        log.info(
            "%s",
            t.outcome or t.status.value,
            extra={
                "batch": rec.batch,
                "line_id": rec.id,
                "job_id": str(t.changes.get("job_id") or rec.job_id) or None,
                "provider": rec.provider,
                "step": (rec.info.step or "").__str__(),
                "outcome": t.outcome or t.status.value,
            },
        )
        if t.status is LineStatus.FAILED:
            report.failed.append(rec.id)
        self.rt.observe(rec, t)
        if t.limit is not None:
            spec = self.rt.settings.provider_config(rec.provider)
            state.note_429(
                rec.provider,
                t.limit.kind,
                t.limit.retry_after,
                state.in_flight(rec.provider),
                spec.max_in_flight,
                spec.requests_per_second,
                floor_rate=min(0.5, spec.requests_per_second),
            )
        if t.stop is not None and ctx.status is BatchStatus.RUNNING:
            reason, message = t.stop
            state.set_batch(
                rec.batch, status=BatchStatus.STOPPING, stop_reason=reason, stop_message=message
            )
            state.wake("stop")
        if applied.last:
            self.on_last(rec.batch)
        return True

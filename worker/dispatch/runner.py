"""Run a dispatched step for a group of lines: claim each line, let its step decide, apply the
transition, and carry on in the same task when the next step is due at once: the worker that
sees a job finish stores its images (no message is sent for that), and the slot the job freed
is handed to the next READY line of its provider at once (a *handoff*: the same pump the
leader runs, for one submit), so a slot is busy again within milliseconds, not a tick later.

The step that runs is the one the line's status needs (``records.TABLE``), whatever the task
was called: a poll dispatched for a line whose submit died with its worker re-runs the submit.
A line whose seq moved on since dispatch is a stale copy and is skipped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

from jobs.errors import ImagebatchError
from worker import transitions
from worker.lines import steps, store
from worker.lines.endings import fail
from worker.lines.records import TABLE, Home, LineRecord, LineStatus, Step, Transition
from worker.lines.steps import Context
from worker.redis.connect import RedisError
from worker.redis.line_state import home_key
from worker.runtime import Lease, Runtime

log = logging.getLogger("imagebatch.lines")

STEP_FUNCTIONS: dict[Step, Callable[[Context, LineRecord], Transition]] = {
    Step.SUBMIT: steps.submit,
    Step.POLL: steps.poll,
    Step.STORE: store.store,
}
CLAIMED_STEPS = frozenset({Step.SUBMIT, Step.STORE})
"""Steps a second copy must never run at the same time (a paid POST, an upload)."""


@dataclass
class Report:
    """What one task did, for its Celery result (Flower shows it) and for logs."""

    outcomes: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    last: set[str] = field(default_factory=set)
    """Batches whose last line ended in this task: finalize them."""
    handoffs: int = 0

    def as_result(self) -> dict[str, object]:
        return {"outcomes": dict(self.outcomes), "failed": self.failed}


Ready = list[tuple[Context, LineRecord, Transition]]
"""Lines whose images turned out ready in this task, to store before it ends."""

HANDOFFS_PER_TASK = 8
"""A task hands freed slots on at most this often: it stays short, and the leader does the rest."""
NO_LIMITS_YET = (1, 1.0, 1.0)
"""What a handoff may take before the leader has written a provider's limits: one submit."""


class Runner:
    """Runs steps for one task; ``report.last`` names the batches it ended."""

    def __init__(self, rt: Runtime, heartbeat: Lease | None = None) -> None:
        self.rt = rt
        self.heartbeat = heartbeat

    def run(self, dispatched: Step, batch: str, lines: Sequence[tuple[int, int]]) -> Report:
        """Run each line's step; then, for the lines whose images turned out ready, the store
        (so one line's download never delays another line's poll, and its slot)."""
        report = Report()
        meta = self.rt.batch_meta(batch, (seq for _, seq in lines))
        if not meta:
            return report
        ctx = self.rt.context(meta)
        ready: Ready = []
        for idx, seq in lines:
            work = partial(self._first, dispatched, ctx, idx, seq, report, ready)
            self._guarded(batch, idx, report, work)
        for line_ctx, rec, fetched in ready:
            # The images are ready now: store them in this task, with the bytes in hand.
            stored = rec.evolve(status=fetched.status, settled=rec.seq, owner="", **fetched.changes)
            with_bytes = replace(line_ctx, payload=fetched.payload)
            work = partial(self._step, with_bytes, stored, Step.STORE, report, [])
            self._guarded(rec.batch, rec.idx, report, work)
        return report

    def _guarded(self, batch: str, idx: int, report: Report, work: Callable[[], None]) -> None:
        try:
            work()
        except (ImagebatchError, RedisError) as exc:
            # Infrastructure trouble (Redis, the store's setup): the line's lease runs out and
            # the scheduler dispatches it again.
            message = getattr(exc, "message", None) or str(exc)
            log.warning(
                "line %s/%s: %s; it will be taken up again",
                batch,
                idx,
                message,
                extra={"batch": batch, "step": "deferred", "outcome": "deferred"},
            )
            report.outcomes["deferred"] += 1

    def _first(
        self,
        dispatched: Step,
        ctx: Context,
        idx: int,
        seq: int,
        report: Report,
        ready: Ready,
    ) -> None:
        state, batch = self.rt.state, ctx.batch["batch_id"]
        owner = f"{seq}:{uuid.uuid4().hex[:12]}"
        claimed = dispatched in CLAIMED_STEPS
        rec = state.begin(batch, idx, seq, owner) if claimed else state.read(batch, idx)
        if rec is None or rec.seq != seq or rec.info.terminal:
            report.outcomes["stale"] += 1
            return
        step = rec.info.step
        assert step is not None
        if step in CLAIMED_STEPS and not claimed:
            rec = state.begin(batch, idx, seq, owner)
            if rec is None:
                report.outcomes["stale"] += 1
                return
        if rec.starts > self.rt.settings.max_deliveries:
            poison = ImagebatchError(
                f"the line's {step} step was started {rec.starts - 1} times without finishing "
                "(its worker kept dying)",
                type="poison",
            )
            self._apply(ctx, rec, fail(rec, poison), report)
            return
        self._step(ctx, rec, step, report, ready)

    def _step(
        self, ctx: Context, rec: LineRecord, step: Step, report: Report, ready: Ready
    ) -> None:
        started = time.perf_counter()
        with self._held(rec):
            t = STEP_FUNCTIONS[step](ctx, rec)
        seconds = time.perf_counter() - started
        inline = t.status is LineStatus.FETCHED and t.due_in == 0
        if inline:
            # Stored by this task: the line is ours for a lease, like any dispatched step.
            t = replace(t, due_in=self.rt.settings.lease_s)
        if not self._apply(ctx, rec, t, report, seconds):
            return
        if inline:
            ready.append((ctx, rec, t))
        if rec.info.home is Home.FLIGHT and TABLE[t.status].home is not Home.FLIGHT:
            self._hand_off(rec.provider, report, ready)

    def _hand_off(self, provider: str, report: Report, ready: Ready) -> None:
        """The line left its slot: give the slot to the provider's next READY line now, within
        the provider's cap and submit budget (only for job APIs, whose submit is quick)."""
        if report.handoffs >= HANDOFFS_PER_TASK or not self.rt.provider(provider).polled:
            return
        pumped = self.rt.state.pump(
            provider,
            time.time(),
            self.rt.settings.lease_s,
            polls=0,
            submits=1,
            defaults=NO_LIMITS_YET,
        )
        for batch, idx, seq in pumped.submits:
            report.handoffs += 1
            meta = self.rt.batch_meta(batch, (seq,))
            if not meta:
                continue  # its batch is gone: the pump's orphan check drops the line next time
            work = partial(self._first, Step.SUBMIT, self.rt.context(meta), idx, seq, report, ready)
            self._guarded(batch, idx, report, work)

    @contextmanager
    def _held(self, rec: LineRecord) -> Iterator[None]:
        if self.heartbeat is None:
            yield
            return
        with self.heartbeat.holding(
            home_key(rec.info.home, rec.provider, rec.batch, rec.queue), rec.member
        ):
            yield

    def _apply(
        self,
        ctx: Context,
        rec: LineRecord,
        t: Transition,
        report: Report,
        seconds: float | None = None,
    ) -> bool:
        # A line's counts land with its transition (not at the task's end): a batch whose last
        # line ends in another task meanwhile is finalized with every count in its summary.
        applied = transitions.apply(self.rt, rec, t, meta=ctx.batch, seconds=seconds)
        if not applied.applied:
            report.outcomes["stale"] += 1
            return False
        report.outcomes[t.outcome or t.status.value] += 1
        if t.status is LineStatus.FAILED:
            report.failed.append(rec.id)
        if applied.last:
            report.last.add(rec.batch)
        return True

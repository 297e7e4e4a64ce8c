"""The fleet's dispatcher: decides what may run now and sends exactly that as tasks.

Every worker runs a ``SchedulerThread``; one of them holds the leader lock at a time (a
token lock with a TTL, renewed while it lives; another worker takes over within seconds of
its death). The leader, for each provider, asks ``pump.lua`` for the lines its free slots
and request budget allow (due polls first-class, READY lines taking slots), for store steps
that are due, and for each batch whether the window has room (a feed), rows to write (a
flush) or nothing left (finalize). It then sleeps until the next thing is due or an event
(a slot freed, a line ended, a 429) wakes it.

So the broker's queue only ever holds work that can run now: a line waiting for a slot
costs no message, a waiting poll costs no ETA task, and a dispatch lost with its worker is
found again by its lease running out (every dispatched line carries one).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Protocol

from jobs.errors import ImagebatchError
from jobs.policy import POLL_LEAD_S
from worker.dispatch.limits import Controllers
from worker.groups.form import GroupDispatch
from worker.lines.records import TABLE, BatchStatus, Step
from worker.redis import keys
from worker.redis.connect import LockLost, Unavailable
from worker.runtime import Runtime

log = logging.getLogger(__name__)

IDLE_S = 1.0
"""The longest the leader sleeps without an event: how late a newly due line can start."""
BATCH_PASS_S = 0.5
MIN_TICK_S = 0.1
"""Events closer together than this are handled in one pass (a burst of lines ending)."""
PROMPT = frozenset({"admit", "batch", "stop"})
"""Events that come one at a time, acted on at once: a feed's new lines (a batch's first
submits go out with them, not a tick later), a batch started, stopped or cancelled."""
LEADER_TTL_S = 10.0
GROUP = 8
"""At most this many lines per task; fewer when few are dispatched, so they run in parallel."""
MOST_PER_PUMP = 512
"""A pump hands out at most this many of each kind (the budgets bound it first)."""


class Dispatch(Protocol):
    """How the scheduler hands work to the fleet (``worker.tasks`` sends Celery tasks)."""

    def step(self, step: Step, batch: str, lines: Sequence[tuple[int, int]]) -> None: ...

    def batch_task(self, name: str, batch: str) -> None: ...

    def group(self, batch: str, group: str, seq: int) -> None:
        """A group provider's group step (``worker.groups``)."""
        ...


def groups(lines: Sequence[tuple[int, int]], size: int = GROUP) -> Iterator[list[tuple[int, int]]]:
    """Split lines into tasks of at most ``size`` (one, for calls that take long)."""
    for start in range(0, len(lines), size):
        yield list(lines[start : start + size])


def settle(events: frozenset[str], since_tick: float) -> float:
    """How long the leader lets more events arrive before it acts on ``events``, woken
    ``since_tick`` seconds after its last pass: a burst (many lines ending at once) is handled
    in one pass, a prompt event at once."""
    if events & PROMPT:
        return 0.0
    return max(0.005, MIN_TICK_S - since_tick)


class Scheduler:
    """One dispatch pass at a time (``tick``); ``SchedulerThread`` runs them as the leader."""

    def __init__(self, rt: Runtime, dispatch: Dispatch) -> None:
        self.rt, self.dispatch = rt, dispatch
        self.controllers = Controllers(rt.state, rt.settings)
        self.groups = GroupDispatch(rt, dispatch)
        self.next_due: dict[str, float] = {}
        self.next_store = 0.0
        self.next_batches = 0.0
        self.providers: set[str] = set()
        self.providers_at = 0.0
        self.sent: dict[tuple[str, str], tuple[float, str]] = {}

    def tick(self, events: frozenset[str] = frozenset()) -> float:
        """Dispatch what is due (and what the woken ``events`` may have made possible);
        returns how long nothing needs doing.

        Events: ``line`` (a slot freed or a line ended), ``admit`` (new READY lines),
        ``due`` (a poll due before the leader meant to look again),
        ``limit`` (a 429 changed a provider's limits), ``store`` (a store is due now),
        ``batch``/``stop`` (a batch started, stopped or was cancelled); ``quit`` (this worker
        stopping) asks for nothing."""
        now = time.time()
        pump_all = bool(events & {"line", "admit", "limit", "batch", "stop", "due"})
        if events & {"admit", "batch"} or now - self.providers_at > 2.0:
            self.providers = self.rt.state.providers()
            self.providers_at = now
        wait = IDLE_S
        for provider in sorted(self.providers - self.next_due.keys()):
            # A provider new to this leader first tells the others its cap and budget: a
            # pool's dearer member then never waits a pass for a cheaper one to pump.
            self.rt.state.pump(
                provider,
                now,
                self.rt.settings.lease_s,
                polls=0,
                submits=0,
                defaults=self.controllers.defaults(provider, now),
            )
        deferred: list[str] = []
        for provider in sorted(self.providers):
            if pump_all or now >= self.next_due.get(provider, 0.0):
                self.next_due[provider] = now + self._pump(provider, now, deferred)
            wait = min(wait, self.next_due[provider] - now)
        for provider in deferred:
            # A pool's lines this provider left to a cheaper member pumped after it: what that
            # member could not take, this one takes now rather than next pass.
            self.next_due[provider] = now + self._pump(provider, now, [])
            wait = min(wait, self.next_due[provider] - now)
        if "store" in events or now >= self.next_store:
            self.next_store = now + self._stores(now)
        wait = min(wait, self.next_store - now)
        urgent = bool(events & {"batch", "stop", "admit"})
        if urgent or now >= self.next_batches or ("line" in events and self._may_feed(now)):
            self._batches(now)
            self.next_batches = now + BATCH_PASS_S
        return max(0.0, wait)

    def _may_feed(self, now: float) -> bool:
        """A line ended: a batch pass soon (the window may have room), but not on every line."""
        return now >= self.next_batches - BATCH_PASS_S / 2

    def _pump(self, provider: str, now: float, deferred: list[str]) -> float:
        """Hand out what the provider can do now; returns how long until it can do more (and
        adds it to ``deferred`` when it left a pool's lines to a cheaper member)."""
        if self.groups.handles(provider):  # lines go in groups: no slot, no token of their own
            return self.groups.pump(provider, now)
        controllers = self.controllers
        defaults = controllers.defaults(provider, now)
        pumped = self.rt.state.pump(
            provider,
            now,
            self.rt.settings.lease_s,
            polls=MOST_PER_PUMP,
            submits=MOST_PER_PUMP,
            defaults=defaults,
            lead=POLL_LEAD_S,
        )
        if pumped.deferred:
            deferred.append(provider)
        controllers.observe(provider, pumped.binding, now)
        controllers.update_if_due(provider, now)
        by_step: dict[tuple[Step, str], list[tuple[int, int]]] = defaultdict(list)
        for batch, idx, seq in pumped.submits:
            by_step[Step.SUBMIT, batch].append((idx, seq))
        for batch, idx, seq, status in pumped.polls:
            step = TABLE[status].step or Step.POLL
            by_step[step, batch].append((idx, seq))
        # A synchronous provider's submit holds its thread for the whole call: one per task.
        polled = self.rt.provider(provider).polled if self._buildable(provider) else True
        for (step, batch), lines in by_step.items():
            size = GROUP if polled or step is not Step.SUBMIT else 1
            for group in groups(lines, size):
                self.dispatch.step(step, batch, group)
        # Due work held back waits for its budget's next token (or pause's end); held back by
        # the cap, for a slot to free, which wakes the leader. Work not yet due, for its time.
        candidates = [IDLE_S, controllers.until_update(provider, now)]
        if pumped.next_flight is not None and pumped.next_flight > now + POLL_LEAD_S:
            candidates.append(pumped.next_flight - POLL_LEAD_S - now)
        if pumped.next_ready is not None and pumped.next_ready > now:
            candidates.append(pumped.next_ready - now)
        if pumped.binding.submits:
            candidates.append(pumped.submit_wait)
        if pumped.binding.polls:
            candidates.append(pumped.poll_wait)
        return max(0.005, min(candidates))

    def _buildable(self, provider: str) -> bool:
        try:
            self.rt.provider(provider)
        except ImagebatchError:
            return False
        return True

    def _stores(self, now: float) -> float:
        claimed, nxt = self.rt.state.claim_stores(now, self.rt.settings.lease_s, 256)
        by_batch: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for batch, idx, seq in claimed:
            by_batch[batch].append((idx, seq))
        for batch, lines in by_batch.items():
            for group in groups(lines):
                self.dispatch.step(Step.STORE, batch, group)
        return IDLE_S if nxt is None else max(0.005, min(IDLE_S, nxt - now))

    def _batches(self, now: float) -> None:
        state, settings = self.rt.state, self.rt.settings
        for batch in state.active_batches():
            meta = state.batch(batch)
            if not meta or meta.get("status") == BatchStatus.FINISHED:
                state.deactivate(batch)
                continue
            status = BatchStatus(meta.get("status", BatchStatus.RUNNING))
            counts = state.counters(batch)
            total = int(meta.get("total", -1))
            done = int(counts.get("done", 0))
            unflushed = state.unflushed(batch)
            if total >= 0 and done >= total:
                if unflushed or status is not BatchStatus.INTERRUPTED:
                    self._once(now, "finalize", batch, str(done), 30.0)
                continue
            if unflushed and (
                unflushed >= settings.chunk_lines // 2
                or now - self.sent.get(("flush", batch), (0.0, ""))[0] >= settings.flush_interval_s
            ):
                self._once(now, "flush", batch, str(unflushed), settings.flush_interval_s)
            if status is BatchStatus.INTERRUPTED:
                continue
            cursor = int(meta.get("cursor_idx", 0))
            room = int(meta.get("window", 0)) - (int(meta.get("admitted", 0)) - done)
            if status is not BatchStatus.RUNNING:
                self._once(now, "drain", batch, str(cursor), 5.0)
                room = max(room, settings.chunk_lines - unflushed)
            if cursor < total and room >= max(1, int(meta.get("window", 1)) // 4):
                self._once(now, "feed", batch, str(cursor), 30.0)

    def _once(self, now: float, name: str, batch: str, version: str, every: float) -> None:
        """Send a batch task unless the same one (same progress ``version``) went out lately."""
        last = self.sent.get((name, batch))
        if last is not None and last[1] == version and now - last[0] < every:
            return
        self.sent[name, batch] = (now, version)
        self.dispatch.batch_task(name, batch)


class SchedulerThread(threading.Thread):
    """Runs the scheduler while this process holds the leader lock; stands by otherwise."""

    def __init__(self, rt: Runtime, dispatch: Dispatch) -> None:
        super().__init__(name="imagebatch-scheduler", daemon=True)
        self.rt = rt
        self.scheduler = Scheduler(rt, dispatch)
        self.stopped = threading.Event()
        self.leading = threading.Event()

    def run(self) -> None:
        state = self.rt.state
        lock = state.lock(keys.SCHEDULER, timeout=LEADER_TTL_S)
        renewed, failures = 0.0, 0
        events: frozenset[str] = frozenset({"batch"})
        while not self.stopped.is_set():
            try:
                if not self.leading.is_set():
                    if not lock.acquire(blocking=False):
                        self.stopped.wait(2.0)
                        continue
                    self.leading.set()
                    self.scheduler = Scheduler(self.rt, self.scheduler.dispatch)
                    renewed = time.monotonic()
                    log.info("this worker now dispatches for the fleet")
                if time.monotonic() - renewed > LEADER_TTL_S / 3:
                    lock.reacquire()
                    renewed = time.monotonic()
                ticked = time.monotonic()
                wait = self.scheduler.tick(events)
                events = state.wait_for_wake(min(wait, LEADER_TTL_S / 4))
                if events:
                    self.stopped.wait(settle(events, time.monotonic() - ticked))
                    events |= state.drain_wakes()
                failures = 0
            except Unavailable as exc:
                failures += 1
                log.warning("scheduler: Redis unreachable (%s); retrying", exc)
                self.leading.clear()
                self.stopped.wait(min(5.0, 0.2 * 2**failures))
            except LockLost:
                log.warning("scheduler: lost the leader lock; standing by")
                self.leading.clear()
            except Exception:
                log.exception("scheduler pass failed; retrying")
                self.stopped.wait(1.0)
        if self.leading.is_set():
            with contextlib.suppress(LockLost):
                lock.release()

    def stop(self) -> None:
        """The leader may be blocked reading the next event for seconds: a ``quit`` event (one
        ``tick`` ignores) ends the read, so a worker or ``run`` stops at once, not seconds later."""
        self.stopped.set()
        if self.leading.is_set():
            with contextlib.suppress(*Unavailable):
                self.rt.state.wake("quit")
        self.join(10)

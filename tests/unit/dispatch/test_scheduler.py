"""``Scheduler.tick`` on the suite's real Redis, with a ``Dispatch`` that records what the
leader would send; and the leader's limit controllers (``worker.dispatch.limits``) on the
counts the pumps and 429s leave in Redis.

The recorder stands in for Celery at the dispatch boundary only: every decision the scheduler
takes is read from, and written to, the real Redis state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis

from jobs.output.rows import ResultRow
from jobs.policy import POLL_LEAD_S
from tests.runtime_support import BATCH, PROVIDER, put_line, record, runtime, seed_batch
from worker.dispatch.adaptive import CAP_REGROW_S, Phase
from worker.dispatch.limits import UPDATE_EVERY_S, Controllers
from worker.dispatch.scheduler import (
    GROUP,
    IDLE_S,
    MIN_TICK_S,
    Scheduler,
    SchedulerThread,
    groups,
    settle,
)
from worker.lines.records import LineRecord, LineStatus, Step
from worker.redis import keys
from worker.redis.scheduling import Binding
from worker.redis.state import State
from worker.runtime import Runtime

CAP = 64
RATE = 50.0


class Recorder:
    """A ``Dispatch`` that keeps what it was asked to send, in order."""

    def __init__(self) -> None:
        self.steps: list[tuple[Step, str, list[tuple[int, int]]]] = []
        self.tasks: list[tuple[str, str]] = []

    def step(self, step: Step, batch: str, lines: Sequence[tuple[int, int]]) -> None:
        self.steps.append((step, batch, list(lines)))

    def batch_task(self, name: str, batch: str) -> None:
        self.tasks.append((name, batch))

    def group(self, batch: str, group: str, seq: int) -> None:
        self.tasks.append(("group", batch))

    def lines(self, step: Step | None = None) -> list[int]:
        return [idx for s, _, group in self.steps if step in (None, s) for idx, _ in group]

    def clear(self) -> None:
        self.steps.clear()
        self.tasks.clear()


@pytest.fixture(scope="module")
def _runtimes(redis_url: str) -> Iterator[dict[frozenset[tuple[str, Any]], Runtime]]:
    """Runtimes by their settings, kept for the module (building one takes a while)."""
    built: dict[frozenset[tuple[str, Any]], Runtime] = {}
    yield built
    for rt in built.values():
        rt.close()


@pytest.fixture
def make(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    _runtimes: dict[frozenset[tuple[str, Any]], Runtime],
) -> Any:
    """``make(**settings)``: a new scheduler with a recorder, on an empty Redis."""

    def build(**values: Any) -> tuple[Scheduler, Recorder, State]:
        defaults: dict[str, Any] = {
            "simulator_base_url": "http://127.0.0.1:9",  # built, never called
            "simulator_max_in_flight": CAP,
            "simulator_requests_per_second": RATE,
            "openai_api_key": "sk-test-key",
        }
        wanted = defaults | values
        # A setting given as None is left to its default (as if the user never set it).
        wanted = {name: value for name, value in wanted.items() if value is not None}
        key = frozenset(wanted.items())
        if key not in _runtimes:
            _runtimes[key] = runtime(redis_url, **wanted)
        rt = _runtimes[key]
        recorder = Recorder()
        return Scheduler(rt, recorder), recorder, rt.state

    return build


def ready(
    state: State,
    count: int,
    *,
    start: int = 0,
    provider: str = PROVIDER,
    batch: str = BATCH,
    at: float | None = None,
) -> list[LineRecord]:
    when = time.time() - 5 if at is None else at
    recs = [record(start + k, provider=provider, batch=batch) for k in range(count)]
    for k, rec in enumerate(recs):
        put_line(state, rec, score=when + k * 0.001)
    return recs


def in_flight(
    state: State,
    count: int,
    *,
    start: int = 100,
    due: float,
    status: LineStatus = LineStatus.SUBMITTED,
) -> list[LineRecord]:
    recs = [record(start + k, status=status, seq=3, job_id=f"j{k}") for k in range(count)]
    for rec in recs:
        put_line(state, rec, score=due)
    return recs


def add_rows(state: State, count: int, batch: str = BATCH) -> None:
    """Rows of finished lines waiting for a flush, as apply.lua leaves them."""
    for k in range(count):
        entry = ResultRow(line=k + 1, id=f"l{k}", status="succeeded").model_dump_json()
        state.client.rpush(keys.rows(batch), f"{k}\t{entry}")


# -- what a tick dispatches -------------------------------------------------------------------


def test_a_tick_submits_only_as_many_lines_as_there_are_free_slots(make: Any) -> None:
    scheduler, sent, state = make(simulator_max_in_flight=3)
    ready(state, 5)

    scheduler.tick()

    assert sorted(sent.lines(Step.SUBMIT)) == [0, 1, 2]
    assert state.in_flight(PROVIDER) == 3 and state.waiting(PROVIDER) == 2
    scheduler.tick(frozenset({"line"}))
    assert len(sent.lines()) == 3  # no slot freed: nothing more


def test_a_freed_slot_is_filled_on_the_next_tick(make: Any) -> None:
    scheduler, sent, state = make(simulator_max_in_flight=1)
    ready(state, 2)
    scheduler.tick()
    state.client.zrem(keys.flight(PROVIDER), f"{BATCH} 0")  # the first line left flight
    time.sleep(1 / RATE)  # and the rate's next token came (a cap of 1 bursts one at a time)

    scheduler.tick(frozenset({"line"}))

    assert sent.lines(Step.SUBMIT) == [0, 1]


def test_a_tick_sends_no_more_requests_than_the_rate_allows(make: Any) -> None:
    scheduler, sent, state = make(simulator_requests_per_second=0.5)
    ready(state, 5)

    scheduler.tick()
    scheduler.tick(frozenset({"line"}))  # at once: the next token comes in two seconds

    assert sent.lines(Step.SUBMIT) == [0]
    assert state.waiting(PROVIDER) == 4


def test_a_paused_provider_gets_no_request_until_its_pause_ends(make: Any) -> None:
    scheduler, sent, state = make()
    scheduler.controllers.watch(PROVIDER, time.time())  # the leader writes the limits
    # Given the controller paused both kinds (an account that refuses everything)
    state.set_limits(PROVIDER, submit_pause=time.time() + 30, poll_pause=time.time() + 30)
    ready(state, 2)
    in_flight(state, 1, due=time.time() - 1)

    scheduler.tick(frozenset({"admit"}))
    scheduler.tick(frozenset({"limit"}))

    assert sent.steps == []


def test_due_polls_go_out_as_polls_and_a_submit_whose_lease_ran_out_as_a_submit(
    make: Any,
) -> None:
    scheduler, sent, state = make()
    now = time.time()
    in_flight(state, 2, due=now - 1)
    in_flight(state, 1, start=200, due=now - 1, status=LineStatus.SUBMITTING)
    in_flight(state, 1, start=300, due=now + 60)  # not due

    scheduler.tick()

    assert sorted(sent.lines(Step.POLL)) == [100, 101]
    assert sent.lines(Step.SUBMIT) == [200]
    assert {seq for _, _, group in sent.steps for _, seq in group} == {4}  # the new seq


def test_due_store_steps_go_out_as_store_tasks(make: Any) -> None:
    scheduler, sent, state = make()
    for k in range(3):
        put_line(state, record(k, status=LineStatus.FETCHED, seq=2), score=time.time() - 1)
    put_line(state, record(9, status=LineStatus.FETCHED, seq=2), score=time.time() + 60)

    scheduler.tick()

    assert sent.steps == [(Step.STORE, BATCH, [(0, 3), (1, 3), (2, 3)])]


def test_lines_of_a_polled_provider_go_out_in_groups_of_at_most_eight(make: Any) -> None:
    scheduler, sent, state = make()
    ready(state, 20)

    scheduler.tick()

    assert [len(group) for _, _, group in sent.steps] == [GROUP, GROUP, 4]
    assert sorted(sent.lines()) == list(range(20))


def test_submits_to_a_synchronous_provider_go_out_one_line_per_task(make: Any) -> None:
    scheduler, sent, state = make(openai_requests_per_second=10.0, openai_max_in_flight=4)
    ready(state, 3, provider="openai")

    scheduler.tick()

    assert [group for _, _, group in sent.steps] == [[(0, 2)], [(1, 2)], [(2, 2)]]


def test_lines_of_different_batches_go_out_in_different_tasks(make: Any) -> None:
    scheduler, sent, state = make()
    ready(state, 2, batch="b-one")
    ready(state, 2, batch="b-two", start=5)

    scheduler.tick()

    assert sorted((batch, [idx for idx, _ in group]) for _, batch, group in sent.steps) == [
        ("b-one", [0, 1]),
        ("b-two", [5, 6]),
    ]


def test_groups_split_lines_into_tasks_of_the_given_size() -> None:
    lines = [(k, 1) for k in range(5)]

    assert [len(g) for g in groups(lines, 2)] == [2, 2, 1]
    assert [len(g) for g in groups(lines)] == [5]
    assert list(groups([], 3)) == []


# -- batch tasks ------------------------------------------------------------------------------


def test_a_batch_with_room_in_its_window_is_fed_once_until_its_cursor_moves(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=100, window=16)

    scheduler.tick(frozenset({"batch"}))
    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == [("feed", BATCH)]
    state.set_batch(BATCH, cursor_idx=16, admitted=16)
    state.add_counts(BATCH, done=10)  # ten lines ended: room for ten

    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == [("feed", BATCH), ("feed", BATCH)]


def test_a_window_without_a_quarter_free_is_not_fed(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=100, window=16, cursor_idx=16, admitted=16)
    state.add_counts(BATCH, done=3)  # room 3 < 16 / 4

    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == []


def test_a_batch_whose_manifest_is_all_admitted_is_not_fed(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=10, window=16, cursor_idx=10, admitted=10)

    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == []


def test_finished_rows_are_flushed_and_not_flushed_twice_in_a_row(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=10, cursor_idx=10, admitted=10)
    add_rows(state, 2)

    scheduler.tick(frozenset({"batch"}))
    scheduler.tick(frozenset({"batch"}))
    add_rows(state, 1)  # one more row, but neither half a chunk nor the flush interval yet
    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == [("flush", BATCH)]


def test_half_a_chunk_of_rows_is_flushed_at_once(make: Any) -> None:
    scheduler, sent, state = make(chunk_lines=4)
    seed_batch(state, total=10, cursor_idx=10, admitted=10)
    add_rows(state, 1)
    scheduler.tick(frozenset({"batch"}))

    add_rows(state, 1)  # two rows: half of a 4-line chunk
    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == [("flush", BATCH), ("flush", BATCH)]


def test_a_batch_whose_lines_are_all_done_is_finalized_once(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=3, cursor_idx=3, admitted=3)
    state.add_counts(BATCH, done=3)

    for _ in range(3):
        scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == [("finalize", BATCH)]


def test_an_interrupted_batch_is_not_finalized_so_the_command_can_resume_it(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=3, status="interrupted", cursor_idx=3, admitted=3)
    state.add_counts(BATCH, done=3)

    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == []


def test_an_interrupted_batch_is_neither_fed_nor_drained(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=100, status="interrupted")

    scheduler.tick(frozenset({"batch"}))

    assert sent.tasks == []


def test_a_stopped_batch_is_drained_and_its_rest_fed_to_end_once(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=100, window=16, status="stopping", cursor_idx=16, admitted=16)

    scheduler.tick(frozenset({"stop"}))
    scheduler.tick(frozenset({"stop"}))

    # The window is full, but lines of a stopped batch only end: they are fed regardless.
    assert sent.tasks == [("drain", BATCH), ("feed", BATCH)]


def test_a_finished_batch_leaves_the_active_set(make: Any) -> None:
    scheduler, sent, state = make()
    seed_batch(state, total=3, status="finished")

    scheduler.tick(frozenset({"batch"}))

    assert state.active_batches() == [] and sent.tasks == []


# -- how long the leader sleeps ---------------------------------------------------------------


def test_with_nothing_to_do_the_leader_sleeps_the_idle_time(make: Any) -> None:
    scheduler, _, _ = make()

    assert scheduler.tick() == pytest.approx(IDLE_S, abs=0.05)


def test_the_leader_sleeps_until_the_next_poll_is_nearly_due(make: Any) -> None:
    scheduler, sent, state = make()
    due = time.time() + 0.5
    in_flight(state, 1, due=due)

    before = time.time()
    wait = scheduler.tick()

    assert due - POLL_LEAD_S - time.time() <= wait <= due - POLL_LEAD_S - before
    assert sent.steps == []


def test_a_poll_due_within_the_lead_goes_out_now_and_a_later_one_waits(make: Any) -> None:
    """Handed out a moment ahead, the poll's task waits for its time (``steps.poll``): a pass
    of the leader can then come up to ``POLL_LEAD_S`` late and the poll still leaves on time."""
    scheduler, sent, state = make()
    now = time.time()
    in_flight(state, 1, due=now + POLL_LEAD_S / 2)
    in_flight(state, 1, start=200, due=now + 3 * POLL_LEAD_S)

    scheduler.tick()

    assert sent.lines(Step.POLL) == [100]


def test_the_leader_sleeps_until_a_waiting_line_may_be_submitted(make: Any) -> None:
    scheduler, _, state = make()
    due = time.time() + 0.4
    ready(state, 1, at=due)

    before = time.time()
    wait = scheduler.tick()

    assert due - time.time() <= wait <= due - before


def test_work_held_back_by_the_rate_waits_for_the_next_token(make: Any) -> None:
    scheduler, sent, state = make(simulator_requests_per_second=2.5)
    ready(state, 3)

    wait = scheduler.tick()

    assert len(sent.lines()) == 2  # a burst of four fifths of a second's worth
    assert wait == pytest.approx(0.4, abs=0.02)  # one token every 0.4 s


def test_work_held_back_by_the_cap_waits_for_a_slot_to_wake_it(make: Any) -> None:
    scheduler, sent, state = make(simulator_max_in_flight=1)
    ready(state, 2)

    wait = scheduler.tick()

    assert len(sent.lines()) == 1
    assert wait == pytest.approx(IDLE_S, abs=0.05)


# -- the leader's limit controllers ---------------------------------------------------------


def sent(state: State, kind: str, count: int) -> None:
    """Requests of a kind going out, as pump.lua counts them."""
    state.client.hincrby(keys.limit(PROVIDER), f"{kind}_sent", count)


def refused(state: State, kind: str, count: int) -> None:
    for _ in range(count):
        state.note_429(PROVIDER, kind, cap=None, retry_after=1.0)


def rates(state: State) -> tuple[float, float]:
    limits = state.limits(PROVIDER)
    return float(limits["submit_rate"]), float(limits["poll_rate"])


def test_limits_the_user_configured_are_the_account_s_and_start_at_once(make: Any) -> None:
    scheduler, _, state = make()  # the fixture sets the simulator's cap and rate
    ready(state, 1)

    scheduler.tick()

    limits = state.limits(PROVIDER)
    assert (limits["cap"], rates(state)) == (str(CAP), (RATE, RATE))


def test_default_limits_are_guesses_approached_by_slow_start(make: Any) -> None:
    # Given a provider whose limits nobody configured (the registry's defaults)
    scheduler, _, state = make(simulator_max_in_flight=None, simulator_requests_per_second=None)
    config = scheduler.rt.settings.provider_config(PROVIDER)
    assert config.configured == frozenset()
    ready(state, 1)

    scheduler.tick()

    # Then it starts at a quarter of them (polls at half) and grows while they hold work back
    limits = state.limits(PROVIDER)
    assert int(limits["cap"]) == config.max_in_flight // 4
    assert rates(state) == pytest.approx((config.submit_rate / 4, config.poll_rate / 2))
    controllers = Controllers(state, scheduler.rt.settings)
    now = time.time()
    controllers.observe(PROVIDER, Binding(submits=True), now)
    sent(state, "submit", int(config.submit_rate / 4))
    assert controllers.update_if_due(PROVIDER, now + UPDATE_EVERY_S)
    assert rates(state)[0] == pytest.approx(config.submit_rate / 2)  # doubled: no 429 came


def test_a_budget_used_up_by_workers_handoffs_grows_in_slow_start_as_if_the_leader_saw_it(
    make: Any,
) -> None:
    # Given default limits, and polls going out as fast as their rate allows, all sent by
    # workers handing a freed slot on (the leader's own pumps never held one back)
    scheduler, _, state = make(simulator_max_in_flight=None, simulator_requests_per_second=None)
    config = scheduler.rt.settings.provider_config(PROVIDER)
    ready(state, 1)
    scheduler.tick()
    controllers = Controllers(state, scheduler.rt.settings)
    now = time.time()
    controllers.watch(PROVIDER, now)
    sent(state, "poll", int(config.poll_rate / 2))

    assert controllers.update_if_due(PROVIDER, now + UPDATE_EVERY_S)

    # Then the poll rate doubles, and submits, which went nowhere near theirs, do not
    assert rates(state) == pytest.approx((config.submit_rate / 4, config.poll_rate))


def test_sporadic_429s_do_not_slow_submits(make: Any) -> None:
    scheduler, _, state = make()
    controllers = Controllers(state, scheduler.rt.settings)
    now = time.time()
    # When a few percent of submits are refused, second after second, at full pace
    for second in range(1, 31):
        sent(state, "submit", int(RATE))
        refused(state, "submit", 1 if second % 3 == 0 else 0)
        controllers.observe(PROVIDER, Binding(submits=True), now + second)
        controllers.update_if_due(PROVIDER, now + second)
    # Then the rate stays at the ceiling
    assert rates(state)[0] == pytest.approx(RATE, rel=0.05)


def test_a_poll_429_slows_polls_not_submits(make: Any) -> None:
    scheduler, _, state = make()
    controllers = Controllers(state, scheduler.rt.settings)
    now = time.time()
    # When half the polls are refused (a provider whose reads share a smaller budget)
    for second in range(1, 11):
        sent(state, "poll", int(RATE))
        refused(state, "poll", int(RATE) // 2)
        sent(state, "submit", 10)
        controllers.observe(PROVIDER, Binding(polls=True), now + second)
        controllers.update_if_due(PROVIDER, now + second)
    # Then the poll rate is cut to about what got through, and submits keep theirs
    submit_rate, poll_rate = rates(state)
    assert poll_rate <= 0.6 * RATE
    assert submit_rate == RATE


def test_a_concurrency_429_cut_in_a_task_holds_and_regrows_only_after_a_quiet_while(
    make: Any,
) -> None:
    scheduler, _, state = make()
    controllers = Controllers(state, scheduler.rt.settings)
    now = time.time()
    controllers.update_if_due(PROVIDER, now)
    # When a task's concurrency 429 shows the account runs 5 of ours at most
    state.note_429(PROVIDER, "submit", cap=5, retry_after=2.0)
    assert state.limits(PROVIDER)["cap"] == "5"
    # Then the leader keeps the cut, while the cap holds work back...
    for second in range(1, int(CAP_REGROW_S)):
        controllers.observe(PROVIDER, Binding(cap=True), now + second)
        controllers.update_if_due(PROVIDER, now + second)
    assert state.limits(PROVIDER)["cap"] == "5"
    # ...and tries one more job only after holding it back that long without a 429
    for second in range(int(CAP_REGROW_S), int(CAP_REGROW_S) + 3):
        controllers.observe(PROVIDER, Binding(cap=True), now + second)
        controllers.update_if_due(PROVIDER, now + second)
    assert state.limits(PROVIDER)["cap"] == "6"


def test_a_new_leader_takes_over_the_learned_limits(make: Any) -> None:
    scheduler, _, state = make()
    first = Controllers(state, scheduler.rt.settings)
    now = time.time()
    first.update_if_due(PROVIDER, now)
    state.note_429(PROVIDER, "submit", cap=7, retry_after=None)
    first.update_if_due(PROVIDER, now + UPDATE_EVERY_S)

    second = Controllers(state, scheduler.rt.settings)  # the old leader died

    assert second.defaults(PROVIDER, now + 2)[0] == 7
    assert second.watch(PROVIDER, now + 2).limits.cap.phase is Phase.STEADY


def test_the_scheduler_hands_out_no_more_than_the_cap_a_task_just_cut(make: Any) -> None:
    scheduler, sent_, state = make()
    ready(state, 5)
    scheduler.tick()
    assert len(sent_.lines()) == 5
    state.note_429(PROVIDER, "submit", cap=2, retry_after=None)  # five were too many
    for member in [f"{BATCH} {k}" for k in range(5)]:
        state.client.zrem(keys.flight(PROVIDER), member)
    ready(state, 5, start=10)

    scheduler.tick(frozenset({"limit"}))

    assert len(sent_.lines()) == 5 + 2


def test_a_feed_s_new_lines_go_out_at_once_while_lines_ending_together_are_gathered() -> None:
    # A batch's first lines, admitted by the feed a moment after the pass that sent it, go
    # out now (not a pass later); lines ending together wait for each other, up to a pass
    just_ticked = 0.01
    assert settle(frozenset({"admit"}), just_ticked) == 0.0
    assert settle(frozenset({"batch", "line"}), just_ticked) == 0.0
    assert settle(frozenset({"line"}), just_ticked) == pytest.approx(MIN_TICK_S - just_ticked)
    assert settle(frozenset({"line"}), 2 * MIN_TICK_S) == pytest.approx(0.005)


def test_a_leading_scheduler_stops_at_once_not_when_its_wait_for_the_next_event_ends(
    make: Any,
) -> None:
    # Given a scheduler thread that leads the fleet and, with nothing to do, waits in Redis
    # for the next event (up to IDLE_S)
    scheduler, recorder, _ = make()
    thread = SchedulerThread(scheduler.rt, recorder)
    thread.start()
    try:
        assert thread.leading.wait(5.0), "the thread never took the leader lock"
        time.sleep(0.2)
        # When its worker stops
        started = time.monotonic()
        thread.stop()
        took = time.monotonic() - started
    finally:
        thread.stopped.set()
        thread.join(5.0)
    # Then it has stopped well before that wait would have ended by itself
    assert not thread.is_alive()
    assert took < IDLE_S / 2, took

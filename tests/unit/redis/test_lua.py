"""Every script in ``worker/redis/lua/``, run through ``State`` on the suite's real Redis.

Each test builds the keys a script reads exactly as the runtime leaves them (``put_line``
writes a record and its home zset the way ``admit``/``pump`` do) and asserts the whole effect:
what moved, what was counted, what was left alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from jobs.output.rows import ResultRow
from tests.runtime_support import (
    BATCH,
    PROVIDER,
    put_line,
    record,
    seed_batch,
    text_client,
)
from worker.lines.records import LineRecord, LineStatus, Transition, first_seq
from worker.redis import keys
from worker.redis.scheduling import Binding, Pumped
from worker.redis.state import State

MODEL = "gpt-image-1.5"
LEASE = 30.0
OPTIONS: dict[str, Any] = {"model": MODEL, "index_jobs": False}


@pytest.fixture
def state(redis_client: redis.Redis[bytes], redis_url: str) -> Iterator[State]:
    """A ``State`` on an empty Redis (``redis_client`` flushes it first)."""
    client = text_client(redis_url)
    try:
        yield State(client)
    finally:
        client.close()


def snapshot(client: redis.Redis[str]) -> dict[str, Any]:
    """Every key and its whole value: two snapshots are equal when nothing changed."""
    out: dict[str, Any] = {}
    for key in sorted(client.scan_iter()):
        kind = client.type(key)  # type: ignore[no-untyped-call]
        if kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            out[key] = client.lrange(key, 0, -1)
        elif kind == "set":
            out[key] = sorted(client.smembers(key))
        else:
            out[key] = client.get(key)
    return out


def score(state: State, zset: str, rec: LineRecord) -> float | None:
    return state.client.zscore(zset, rec.member)


def wakes(state: State) -> list[str]:
    return state.client.lrange(keys.WAKE, 0, -1)


def row(rec: LineRecord, status: str = "succeeded", credits: float = 0.0) -> ResultRow:
    return ResultRow.model_validate(
        {"line": rec.line, "id": rec.id, "status": status, "credits": credits}
    )


def ready_lines(state: State, count: int, at: float, start: int = 0) -> list[LineRecord]:
    recs = [record(start + k) for k in range(count)]
    for k, rec in enumerate(recs):
        put_line(state, rec, score=at + k * 0.001)  # in a known order
    return recs


def flight_lines(
    state: State, count: int, at: float, start: int = 100, status: LineStatus = LineStatus.SUBMITTED
) -> list[LineRecord]:
    recs = [record(start + k, status=status, seq=4, job_id=f"job-{k}") for k in range(count)]
    for k, rec in enumerate(recs):
        put_line(state, rec, score=at + k * 0.001)
    return recs


# -- admit.lua ------------------------------------------------------------------------------------


def test_admit_writes_the_lines_into_the_window_and_moves_the_cursor(state: State) -> None:
    seed_batch(state, total=10)
    state.client.delete(keys.WAKE)
    now = time.time()
    lines = [record(0), record(1, provider="openai")]

    assert state.admit(BATCH, 0, (2, 250, 3), lines, [], eligible=now)

    assert [state.read(BATCH, 0), state.read(BATCH, 1)] == lines
    ((member, when),) = state.client.zrange(keys.ready(BATCH, PROVIDER), 0, -1, withscores=True)
    assert member == f"{BATCH} 0" and when == pytest.approx(now)
    assert state.client.zrange(keys.ready(BATCH, "openai"), 0, -1) == [f"{BATCH} 1"]
    assert state.client.smembers(keys.queues("openai")) == {BATCH}
    assert state.providers() == {PROVIDER, "openai"}
    meta = state.batch(BATCH)
    assert (meta["cursor_idx"], meta["cursor_offset"], meta["cursor_line"]) == ("2", "250", "3")
    assert meta["admitted"] == "2"
    assert wakes(state) == ["admit"]


def test_a_second_admit_with_the_stale_cursor_changes_nothing(state: State) -> None:
    seed_batch(state, total=10)
    assert state.admit(BATCH, 0, (2, 250, 3), [record(0), record(1)], [], eligible=time.time())
    before = snapshot(state.client)

    again = state.admit(BATCH, 0, (4, 500, 5), [record(2), record(3)], [], eligible=time.time())

    assert not again
    assert snapshot(state.client) == before


def test_admit_counts_the_rows_of_lines_that_end_at_once(state: State) -> None:
    seed_batch(state, total=10)
    failed = row(record(1), "failed").model_dump_json()
    rejected = ResultRow(line=3, id=None, status="rejected").model_dump_json()

    admitted = state.admit(
        BATCH, 0, (3, 90, 3), [record(0)], [(1, "failed", failed), (2, "rejected", rejected)], 0.0
    )

    assert admitted
    assert state.pending_rows(BATCH, 10) == [f"1\t{failed}", f"2\t{rejected}"]
    assert state.counters(BATCH) == {"done": 2.0, "failed": 1.0, "rejected": 1.0}
    assert state.batch(BATCH)["admitted"] == "3"  # the ended lines passed through the window
    assert state.line_count(BATCH) == 1


def test_an_admit_of_only_skipped_lines_moves_the_cursor_without_a_wake(state: State) -> None:
    seed_batch(state, total=10)
    state.client.delete(keys.WAKE)

    assert state.admit(BATCH, 0, (5, 400, 7), [], [], eligible=0.0)

    assert state.batch(BATCH)["cursor_idx"] == "5"
    assert state.batch(BATCH)["admitted"] == "0"
    assert wakes(state) == []


# -- pump.lua -------------------------------------------------------------------------------------

FAST = 1000.0
"""A rate no test exhausts: only the cap, or the kind the test limits, binds."""


def pump(
    state: State,
    now: float,
    *,
    cap: int = 64,
    submit_rate: float = FAST,
    poll_rate: float = FAST,
    polls: int = 512,
    submits: int = 512,
) -> Pumped:
    return state.pump(
        PROVIDER,
        now,
        LEASE,
        polls=polls,
        submits=submits,
        defaults=(cap, submit_rate, poll_rate),
    )


def test_pump_submits_ready_lines_only_into_free_slots(state: State) -> None:
    now = time.time()
    ready = ready_lines(state, 5, now - 10)
    flight_lines(state, 1, now + 100)  # one slot taken, not due

    pumped = pump(state, now, cap=3)

    assert pumped.submits == [(BATCH, 0, 2), (BATCH, 1, 2)]
    assert pumped.polls == []
    assert pumped.in_flight == 3
    assert state.in_flight(PROVIDER) == 3 and state.waiting(PROVIDER) == 3
    for rec in ready[:2]:
        taken = state.read(BATCH, rec.idx)
        assert taken is not None
        assert (taken.status, taken.seq) == (LineStatus.SUBMITTING, 2)
        assert score(state, keys.flight(PROVIDER), rec) == pytest.approx(now + LEASE)
        assert score(state, keys.ready(BATCH, PROVIDER), rec) is None
    assert pumped.binding == Binding(cap=True)  # due lines left, held back by the cap


def test_pump_with_no_free_slot_submits_nothing(state: State) -> None:
    now = time.time()
    ready_lines(state, 2, now - 10)
    flight_lines(state, 2, now + 100)

    pumped = pump(state, now, cap=2)

    assert pumped.submits == [] and pumped.in_flight == 2
    assert state.waiting(PROVIDER) == 2


def test_submits_spend_their_own_tokens_four_fifths_of_a_second_s_worth_at_most(
    state: State,
) -> None:
    now = time.time()
    ready_lines(state, 10, now - 10)

    first = pump(state, now, submit_rate=5.0)  # a burst of 4
    second = pump(state, now + 0.1, submit_rate=5.0)  # half a token more: none whole
    third = pump(state, now + 0.3, submit_rate=5.0)  # 1.5 tokens: one

    assert [len(p.submits) for p in (first, second, third)] == [4, 0, 1]
    assert second.binding == Binding(submits=True)
    assert second.submit_wait == pytest.approx(0.1, abs=0.01)  # until the next whole token
    assert state.limits(PROVIDER)["submit_sent"] == "5"


def test_pumps_on_two_workers_whose_times_arrive_out_of_order_refill_each_second_once(
    state: State,
) -> None:
    # Given a submit rate of 5 a second, and a pump that read the time after another worker's
    # pump but reached Redis first (a busy machine delays a call between its clock and Redis)
    now = time.time()
    ready_lines(state, 20, now - 10)
    pump(state, now, submit_rate=5.0)  # the burst of 4
    later = pump(state, now + 0.65, submit_rate=5.0)  # 3.25 tokens: 3
    earlier = pump(state, now + 0.4, submit_rate=5.0)  # read its time first, ran second
    after = pump(state, now + 1.05, submit_rate=5.0)  # 0.25 + 2 tokens: 2

    # Then the 0.4 s between them were not refilled twice: 4 + 5 a second, not more
    handed = [len(p.submits) for p in (later, earlier, after)]
    assert handed == [3, 0, 2]
    assert state.limits(PROVIDER)["submit_sent"] == "9"


def test_polls_and_submits_have_separate_budgets(state: State) -> None:
    # Given due polls and READY lines, and a poll budget of 2.5 per second (a burst of 2)
    now = time.time()
    ready_lines(state, 6, now - 10)
    flight_lines(state, 6, now - 10)

    pumped = pump(state, now, poll_rate=2.5)

    # Then polls stop at their budget while submits go on into every free slot
    assert (len(pumped.polls), len(pumped.submits)) == (2, 6)
    assert pumped.binding == Binding(polls=True)
    limits = state.limits(PROVIDER)
    assert (limits["poll_sent"], limits["submit_sent"]) == ("2", "6")


def test_the_limits_the_controller_wrote_win_over_the_defaults(state: State) -> None:
    now = time.time()
    ready_lines(state, 10, now - 10)
    state.set_limits(PROVIDER, cap=3, submit_rate=50.0)

    pumped = pump(state, now, cap=64)

    assert len(pumped.submits) == 3 and pumped.in_flight == 3


@pytest.mark.parametrize("kind", ["submit", "poll"])
def test_a_paused_kind_hands_out_nothing_until_the_pause_ends(state: State, kind: str) -> None:
    now = time.time()
    ready_lines(state, 2, now - 10)
    flight_lines(state, 2, now - 10)
    state.set_limits(PROVIDER, **{f"{kind}_pause": now + 5})

    paused = pump(state, now)
    after = pump(state, now + 6)

    def handed(pumped: Pumped, which: str) -> int:
        return len(pumped.submits) if which == "submit" else len(pumped.polls)

    other = "poll" if kind == "submit" else "submit"
    assert (handed(paused, kind), handed(paused, other)) == (0, 2)
    wait = paused.submit_wait if kind == "submit" else paused.poll_wait
    assert wait == pytest.approx(5.0, abs=0.01)
    assert handed(after, kind) == 2


def test_batches_take_turns_so_a_small_batch_is_not_stuck_behind_a_big_one(
    state: State,
) -> None:
    # Given a big batch whose 50 lines have waited longer than a small batch's 3
    now = time.time()
    for k in range(50):
        put_line(state, record(k, batch="big"), score=now - 100 + k)
    for k in range(3):
        put_line(state, record(k, batch="small"), score=now - 1)

    # When four slots are free
    pumped = pump(state, now, cap=4)

    # Then the two batches share them
    by_batch = sorted(batch for batch, _, _ in pumped.submits)
    assert by_batch == ["big", "big", "small", "small"]
    assert state.client.smembers(keys.queues(PROVIDER)) == {"big", "small"}


def test_a_batch_with_no_ready_line_left_leaves_the_provider_s_queues(state: State) -> None:
    now = time.time()
    put_line(state, record(0, batch="once"), score=now - 1)

    assert len(pump(state, now).submits) == 1
    pump(state, now)

    assert state.client.smembers(keys.queues(PROVIDER)) == set()


def test_a_due_flight_line_is_handed_out_with_a_new_seq_and_a_new_lease(state: State) -> None:
    now = time.time()
    (polled,) = flight_lines(state, 1, now - 1)
    (lost,) = flight_lines(state, 1, now - 2, start=200, status=LineStatus.SUBMITTING)
    (waiting,) = flight_lines(state, 1, now + 50, start=300)

    pumped = pump(state, now)

    # A submit whose lease ran out (its worker died) comes back as what it is, SUBMITTING.
    assert pumped.polls == [
        (BATCH, lost.idx, 5, LineStatus.SUBMITTING),
        (BATCH, polled.idx, 5, LineStatus.SUBMITTED),
    ]
    for rec in (polled, lost):
        assert score(state, keys.flight(PROVIDER), rec) == pytest.approx(now + LEASE)
        after = state.read(BATCH, rec.idx)
        assert after is not None and after.seq == 5 and after.status is rec.status
    untouched = state.read(BATCH, waiting.idx)
    assert untouched is not None and untouched.seq == 4
    assert score(state, keys.flight(PROVIDER), waiting) == pytest.approx(now + 50)


def test_pump_drops_orphan_members_whose_line_hash_is_gone(state: State) -> None:
    now = time.time()
    state.client.zadd(keys.flight(PROVIDER), {"gone 3": now - 5})
    state.client.zadd(keys.ready("gone", PROVIDER), {"gone 4": now - 5})
    state.client.sadd(keys.queues(PROVIDER), "gone")
    (live,) = ready_lines(state, 1, now - 1)

    pumped = pump(state, now)

    assert pumped.polls == []
    assert pumped.submits == [(BATCH, live.idx, 2)]
    assert state.client.zrange(keys.flight(PROVIDER), 0, -1) == [live.member]
    assert state.client.zrange(keys.ready("gone", PROVIDER), 0, -1) == []
    assert not state.client.exists(keys.line("gone", 3), keys.line("gone", 4))


def test_pump_reports_when_the_next_flight_and_ready_lines_are_due(state: State) -> None:
    now = time.time()
    ready_lines(state, 1, now + 7)
    flight_lines(state, 1, now + 5)

    pumped = pump(state, now)

    assert (pumped.polls, pumped.submits) == ([], [])
    assert pumped.next_flight == pytest.approx(now + 5)
    assert pumped.next_ready == pytest.approx(now + 7)
    assert pumped.binding == Binding()


def test_pump_of_an_idle_provider_reports_nothing_due(state: State) -> None:
    pumped = pump(state, time.time())

    assert (pumped.next_flight, pumped.next_ready, pumped.in_flight) == (None, None, 0)


# -- claim.lua ------------------------------------------------------------------------------------


def store_lines(state: State, count: int, at: float, start: int = 0) -> list[LineRecord]:
    recs = [record(start + k, status=LineStatus.FETCHED, seq=3) for k in range(count)]
    for k, rec in enumerate(recs):
        put_line(state, rec, score=at + k * 0.001)
    return recs


def test_claim_takes_the_due_store_lines_with_a_new_seq_and_a_lease(state: State) -> None:
    now = time.time()
    due = store_lines(state, 3, now - 5)
    (later,) = store_lines(state, 1, now + 50, start=10)

    claimed, nxt = state.claim_stores(now, LEASE, 256)

    assert claimed == [(BATCH, rec.idx, 4) for rec in due]
    for rec in due:
        assert score(state, keys.STORE, rec) == pytest.approx(now + LEASE)
    assert score(state, keys.STORE, later) == pytest.approx(now + 50)
    assert nxt == pytest.approx(now + LEASE)


def test_claim_takes_at_most_the_number_asked_for(state: State) -> None:
    now = time.time()
    store_lines(state, 5, now - 5)

    claimed, nxt = state.claim_stores(now, LEASE, 2)

    assert [idx for _, idx, _ in claimed] == [0, 1]
    assert nxt == pytest.approx(now - 5 + 0.002)  # the third is due still


def test_claim_drops_an_orphan_store_member(state: State) -> None:
    now = time.time()
    state.client.zadd(keys.STORE, {"gone 1": now - 5})

    claimed, nxt = state.claim_stores(now, LEASE, 256)

    assert (claimed, nxt) == ([], None)
    assert not state.client.exists(keys.line("gone", 1), keys.STORE)


# -- begin.lua ------------------------------------------------------------------------------------


def test_begin_gives_the_line_to_its_owner_and_returns_the_record(state: State) -> None:
    rec = record(status=LineStatus.SUBMITTING, seq=3)
    put_line(state, rec)

    begun = state.begin(BATCH, 0, 3, "3:aaaa")

    assert begun == rec.evolve(owner="3:aaaa")
    assert state.client.hget(keys.line(BATCH, 0), "owner") == "3:aaaa"


def test_begin_with_a_stale_seq_is_refused(state: State) -> None:
    put_line(state, record(status=LineStatus.SUBMITTING, seq=3))

    assert state.begin(BATCH, 0, 2, "2:late") is None
    assert state.client.hget(keys.line(BATCH, 0), "owner") == ""


def test_a_second_owner_of_the_same_seq_is_refused(state: State) -> None:
    put_line(state, record(status=LineStatus.SUBMITTING, seq=3))
    assert state.begin(BATCH, 0, 3, "3:first") is not None

    assert state.begin(BATCH, 0, 3, "3:second") is None
    assert state.client.hget(keys.line(BATCH, 0), "owner") == "3:first"


def test_the_owner_of_a_previous_seq_does_not_block_a_new_dispatch(state: State) -> None:
    put_line(state, record(status=LineStatus.SUBMITTING, seq=3, owner="2:dead-worker"))

    begun = state.begin(BATCH, 0, 3, "3:next")

    assert begun is not None and begun.owner == "3:next"


def test_begin_on_a_line_that_is_gone_is_refused(state: State) -> None:
    assert state.begin(BATCH, 0, 1, "1:x") is None
    assert not state.client.exists(keys.line(BATCH, 0))


# -- apply.lua ------------------------------------------------------------------------------------


def apply(state: State, rec: LineRecord, t: Transition, **options: Any) -> bool:
    options.setdefault("model", MODEL)
    options.setdefault("index_jobs", False)
    return state.apply(rec, t, **options).applied


def test_apply_with_a_stale_seq_changes_nothing(state: State) -> None:
    seed_batch(state)
    current = record(status=LineStatus.SUBMITTED, seq=5, job_id="j1")
    put_line(state, current, score=123.0)
    before = snapshot(state.client)
    stale = current.evolve(seq=4)
    done = Transition(LineStatus.FAILED, row=row(stale, "failed"))

    result = state.apply(stale, done, model=MODEL, index_jobs=True)

    assert not result.applied and not result.last
    assert snapshot(state.client) == before


def test_a_task_left_over_from_an_earlier_run_of_the_same_batch_id_changes_nothing(
    state: State,
) -> None:
    # Given a line of batch B two dispatches after its admission in an earlier run...
    seed_batch(state)
    earlier = record(status=LineStatus.FETCHED, seq=first_seq(time.time() - 60) + 2)
    # ...and the same line of a new run of B (another --out), admitted a minute later, at the
    # same step after as many dispatches
    current = earlier.evolve(seq=first_seq(time.time()) + 2, settled=first_seq(time.time()))
    put_line(state, current, score=123.0)
    before = snapshot(state.client)

    # When the earlier run's store task, delivered late, applies what it did (its row points
    # at the earlier run's store)
    late = Transition(LineStatus.FAILED, row=row(earlier, "failed"))
    result = state.apply(earlier, late, model=MODEL, index_jobs=True)

    # Then the new run's line is untouched
    assert not result.applied
    assert snapshot(state.client) == before


def test_a_copy_that_read_a_status_the_line_has_left_changes_nothing(state: State) -> None:
    # Given two copies of one poll that both read the line SUBMITTED; the first found the job
    # done and moved the line on with its cost
    seed_batch(state)
    read_by_both = record(status=LineStatus.SUBMITTED, seq=5, job_id="j1")
    put_line(state, read_by_both, score=123.0)
    fetched = Transition(LineStatus.FETCHED, {"artifacts": ({"url": "u"},), "credits": 24.0})
    assert apply(state, read_by_both, fetched)
    before = snapshot(state.client)

    # When the second copy, whose GET came a moment earlier, lands its "still pending"
    pending = Transition(LineStatus.SUBMITTED, {"polls": 1}, due_in=0.4)

    # Then it is stale: the line stays FETCHED (polling it again would add the cost twice)
    assert not apply(state, read_by_both, pending)
    assert snapshot(state.client) == before
    line = state.read(BATCH, read_by_both.idx)
    assert line is not None and line.status is LineStatus.FETCHED and line.credits == 24.0


def test_a_line_walks_from_ready_through_flight_and_store_to_its_row(state: State) -> None:
    seed_batch(state, total=5)
    now = time.time()
    put_line(state, record(), score=now - 1)
    flight, store = keys.flight(PROVIDER), keys.STORE

    ((_, idx, seq),) = pump(state, now, cap=4).submits
    taken = state.read(BATCH, idx)
    assert taken is not None and taken.status is LineStatus.SUBMITTING and taken.seq == seq

    assert apply(state, taken, Transition(LineStatus.SUBMITTED, {"job_id": "j1"}, due_in=5))
    submitted = state.read(BATCH, idx)
    assert submitted is not None
    assert (submitted.status, submitted.job_id, submitted.settled) == ("submitted", "j1", seq)
    assert score(state, flight, submitted) == pytest.approx(time.time() + 5, abs=1)

    artifacts = ({"url": "http://127.0.0.1/cdn/x.png"},)
    assert apply(state, submitted, Transition(LineStatus.FETCHED, {"artifacts": artifacts}))
    fetched = state.read(BATCH, idx)
    assert fetched is not None and fetched.artifacts == artifacts
    assert state.in_flight(PROVIDER) == 0 and score(state, store, fetched) is not None

    assert apply(state, fetched, Transition(LineStatus.SUCCEEDED, row=row(fetched)))
    assert state.read(BATCH, idx) is None
    assert not state.client.exists(store, flight, keys.ready(BATCH, PROVIDER))
    assert state.unflushed(BATCH) == 1


def test_a_transition_within_flight_keeps_the_slot_and_wakes_no_one(state: State) -> None:
    seed_batch(state)
    rec = record(status=LineStatus.SUBMITTING, seq=2, owner="2:me")
    put_line(state, rec)
    state.client.delete(keys.WAKE)

    assert apply(state, rec, Transition(LineStatus.SUBMITTED, {"job_id": "j9", "tries": 0}))

    after = state.read(BATCH, 0)
    assert after is not None
    assert (after.status, after.owner, after.settled, after.job_id) == ("submitted", "", 2, "j9")
    assert state.in_flight(PROVIDER) == 1
    assert wakes(state) == []


def test_a_poll_due_before_the_scheduler_means_to_look_wakes_it(state: State) -> None:
    """The leader sleeps until its next known work; a poll re-planned for a job's end a
    moment away must not wait for that (a second, in a quiet fleet)."""
    seed_batch(state)
    rec = record(status=LineStatus.SUBMITTED, seq=2, owner="2:me", job_id="j1")
    put_line(state, rec)
    # Given a scheduler asleep until a second from now
    state.client.delete(keys.WAKE)
    state.client.set(keys.WAKE_AT, repr(time.time() + 1.0))

    # When a poll plans the next one in 2 s, then (the job nearly done) one in 0.1 s
    assert apply(state, rec, Transition(LineStatus.SUBMITTED, {"polls": 1}, due_in=2.0))
    assert wakes(state) == []
    again = state.read(BATCH, 0)
    assert again is not None
    assert apply(state, again, Transition(LineStatus.SUBMITTED, {"polls": 2}, due_in=0.1))

    # Then only the sooner one woke it
    assert wakes(state) == ["due"]


@pytest.mark.parametrize(
    ("status", "home"),
    [(LineStatus.READY, "ready"), (LineStatus.FETCHED, "store")],
)
def test_leaving_flight_frees_the_slot_and_wakes_the_scheduler(
    state: State, status: LineStatus, home: str
) -> None:
    seed_batch(state)
    rec = record(status=LineStatus.SUBMITTED, seq=2, job_id="j1")
    put_line(state, rec)
    state.client.delete(keys.WAKE)

    assert apply(state, rec, Transition(status, due_in=4.0))

    assert state.in_flight(PROVIDER) == 0
    zset = keys.ready(BATCH, PROVIDER) if home == "ready" else keys.STORE
    assert score(state, zset, rec) == pytest.approx(time.time() + 4.0, abs=1)
    assert wakes(state) == ["line"]
    if home == "ready":  # back in its batch's queue for the provider, for the next pump
        assert state.client.smembers(keys.queues(PROVIDER)) == {BATCH}


def test_images_ready_to_store_now_wake_the_scheduler_for_a_store(state: State) -> None:
    seed_batch(state)
    rec = record(status=LineStatus.SUBMITTED, seq=2, job_id="j1")
    put_line(state, rec)
    state.client.delete(keys.WAKE)

    assert apply(state, rec, Transition(LineStatus.FETCHED, due_in=0.0))

    assert sorted(wakes(state)) == ["line", "store"]


def test_a_store_retry_stays_in_store_and_wakes_no_one(state: State) -> None:
    seed_batch(state)
    rec = record(status=LineStatus.FETCHED, seq=2)
    put_line(state, rec, score=1.0)
    state.client.delete(keys.WAKE)

    assert apply(state, rec, Transition(LineStatus.FETCHED, {"misses": 1}, due_in=3.0))

    assert score(state, keys.STORE, rec) == pytest.approx(time.time() + 3.0, abs=1)
    assert wakes(state) == []
    after = state.read(BATCH, 0)
    assert after is not None and after.misses == 1


def test_a_terminal_transition_pushes_the_row_deletes_the_line_and_counts(state: State) -> None:
    seed_batch(state, total=10)
    rec = record(3, status=LineStatus.FETCHED, seq=2)
    put_line(state, rec)
    blob = state.put_blob(BATCH, 3, 0, b"png bytes", ttl=60)
    state.client.delete(keys.WAKE)
    ended = row(rec, credits=24.0)
    t = Transition(LineStatus.SUCCEEDED, row=ended, counts={"polls": 2})

    result = state.apply(rec, t, model=MODEL, index_jobs=False, drop_keys=[blob])

    assert result.applied and not result.last
    assert state.pending_rows(BATCH, 10) == [f"3\t{ended.model_dump_json()}"]
    assert not state.client.exists(keys.line(BATCH, 3), blob, keys.STORE)
    assert state.counters(BATCH) == {
        "done": 1.0,
        "succeeded": 1.0,
        "polls": 2.0,
        "credits:simulator credits": 24.0,
    }


def test_a_line_ending_in_flight_frees_its_slot_and_wakes_the_scheduler(state: State) -> None:
    seed_batch(state, total=10)
    rec = record(status=LineStatus.SUBMITTING, seq=2)
    put_line(state, rec)
    state.client.delete(keys.WAKE)

    assert apply(state, rec, Transition(LineStatus.FAILED, row=row(rec, "failed")))

    assert state.in_flight(PROVIDER) == 0
    assert wakes(state) == ["line"]


def test_a_failed_line_gives_its_budget_hold_back(state: State) -> None:
    seed_batch(state, total=10)
    state.add_counts(BATCH, reserved=24.0)
    rec = record(status=LineStatus.SUBMITTING, seq=2, reserved=24.0)
    put_line(state, rec)
    t = Transition(LineStatus.FAILED, row=row(rec, "failed"), counts={"reserved": -24.0})

    assert apply(state, rec, t)

    counters = state.counters(BATCH)
    assert counters["reserved"] == 0.0 and counters["failed"] == 1.0
    assert state.in_flight(PROVIDER) == 0


def test_the_batch_s_last_line_to_end_is_reported_as_last(state: State) -> None:
    seed_batch(state, total=2)
    first, second = (record(k, status=LineStatus.FETCHED, seq=2) for k in range(2))
    put_line(state, first)
    put_line(state, second)

    ending = {**OPTIONS, "total": 2}  # the batch's line count, from its record
    one = state.apply(first, Transition(LineStatus.SUCCEEDED, row=row(first)), **ending)
    two = state.apply(second, Transition(LineStatus.FAILED, row=row(second, "failed")), **ending)

    assert (one.last, two.last) == (False, True)
    assert state.counters(BATCH)["done"] == 2.0


def test_an_accepted_job_is_indexed_and_unindexed_when_it_leaves_flight(state: State) -> None:
    seed_batch(state)
    rec = record(status=LineStatus.SUBMITTING, seq=2)
    put_line(state, rec)

    assert apply(state, rec, Transition(LineStatus.SUBMITTED, {"job_id": "j-77"}), index_jobs=True)
    assert state.line_of_job(PROVIDER, "j-77") == (BATCH, 0)

    submitted = state.read(BATCH, 0)
    assert submitted is not None
    assert apply(state, submitted, Transition(LineStatus.FETCHED), index_jobs=True)
    assert state.line_of_job(PROVIDER, "j-77") is None
    assert not state.client.exists(keys.jobs(PROVIDER))


def test_without_webhooks_no_job_is_indexed(state: State) -> None:
    seed_batch(state)
    rec = record(status=LineStatus.SUBMITTING, seq=2)
    put_line(state, rec)

    assert apply(state, rec, Transition(LineStatus.SUBMITTED, {"job_id": "j-78"}))

    assert state.line_of_job(PROVIDER, "j-78") is None


def test_a_finished_job_updates_the_learned_latency(state: State) -> None:
    seed_batch(state)
    assert state.expected_latency(PROVIDER, MODEL) is None
    for idx, latency in enumerate((10.0, 20.0)):
        rec = record(idx, status=LineStatus.SUBMITTED, seq=2, job_id=f"j{idx}")
        put_line(state, rec)
        assert apply(state, rec, Transition(LineStatus.FETCHED, latency_s=latency))
        if idx == 0:
            assert state.expected_latency(PROVIDER, MODEL) == pytest.approx(10.0)

    # mean 15 (halfway, the second of two samples), mean deviation 5: 15 + 5 / 2
    assert state.expected_latency(PROVIDER, MODEL) == pytest.approx(17.5)
    assert state.expected_latency(PROVIDER, "gpt-image-2") is None
    assert 0 < state.client.ttl(keys.latency(PROVIDER, MODEL)) <= 86400


def test_a_transition_without_a_latency_leaves_the_estimate_alone(state: State) -> None:
    seed_batch(state)
    rec = record(status=LineStatus.SUBMITTED, seq=2)
    put_line(state, rec)

    assert apply(state, rec, Transition(LineStatus.FETCHED))

    assert not state.client.exists(keys.latency(PROVIDER, MODEL))


# -- limit.lua ------------------------------------------------------------------------------------


def test_a_rate_429_is_counted_for_its_request_kind_and_changes_no_rate(state: State) -> None:
    state.set_limits(PROVIDER, submit_rate=10.0, poll_rate=20.0)

    state.note_429(PROVIDER, "poll", cap=None, retry_after=None)
    state.note_429(PROVIDER, "submit", cap=None, retry_after=None)
    state.note_429(PROVIDER, "poll", cap=None, retry_after=None)

    limits = state.limits(PROVIDER)
    assert (limits["poll_throttled"], limits["submit_throttled"], limits["throttled"]) == (
        "2",
        "1",
        "3",
    )
    assert (limits["submit_rate"], limits["poll_rate"]) == ("10.0", "20.0")  # the leader decides
    assert wakes(state) == ["limit"] * 3


def test_a_concurrency_429_cuts_the_cap_at_once(state: State) -> None:
    state.set_limits(PROVIDER, cap=16)

    state.note_429(PROVIDER, "submit", cap=5, retry_after=2.0)

    limits = state.limits(PROVIDER)
    assert (limits["cap"], limits["concurrency_throttled"]) == ("5", "1")
    assert "submit_throttled" not in limits  # not evidence against the rate


def test_a_concurrency_429_never_raises_the_cap_nor_drops_it_below_one(state: State) -> None:
    state.set_limits(PROVIDER, cap=3)

    state.note_429(PROVIDER, "submit", cap=10, retry_after=None)
    assert state.limits(PROVIDER)["cap"] == "3"

    state.note_429(PROVIDER, "submit", cap=0, retry_after=None)
    assert state.limits(PROVIDER)["cap"] == "1"


def test_the_largest_retry_after_since_the_controller_last_looked_is_kept(state: State) -> None:
    for wait in (1.0, 5.0, 2.0):
        state.note_429(PROVIDER, "submit", cap=None, retry_after=wait)

    first = state.take_counts(PROVIDER)
    second = state.take_counts(PROVIDER)

    assert first["submit_retry_after"] == "5.0" and "poll_retry_after" not in first
    assert "submit_retry_after" not in second  # each look sees the 429s since the last one
    assert second["submit_throttled"] == "3"


# -- reserve.lua ----------------------------------------------------------------------------------


def test_reserve_holds_estimates_until_the_budget_would_be_exceeded(state: State) -> None:
    held = [state.reserve(BATCH, amount, 10.0) for amount in (4.0, 4.0, 4.0, 2.0)]

    assert held == [True, True, False, True]
    assert state.counters(BATCH)["reserved"] == 10.0


def test_a_refused_reserve_holds_nothing(state: State) -> None:
    assert not state.reserve(BATCH, 11.0, 10.0)

    assert "reserved" not in state.counters(BATCH)


def test_an_estimate_that_fits_exactly_is_not_refused_for_rounding(state: State) -> None:
    assert all(state.reserve(BATCH, 0.1, 0.3) for _ in range(3))
    assert not state.reserve(BATCH, 0.1, 0.3)


def test_a_hold_given_back_makes_room_for_another_line(state: State) -> None:
    assert state.reserve(BATCH, 24.0, 30.0)
    assert not state.reserve(BATCH, 24.0, 30.0)

    state.add_counts(BATCH, reserved=-24.0)  # the line failed without spending

    assert state.reserve(BATCH, 24.0, 30.0)


def test_the_row_json_in_the_rows_list_is_the_row(state: State) -> None:
    seed_batch(state, total=1)
    rec = record(status=LineStatus.FETCHED, seq=2)
    put_line(state, rec)
    ended = row(rec, credits=9.0)

    assert apply(state, rec, Transition(LineStatus.SUCCEEDED, row=ended))

    (entry,) = state.pending_rows(BATCH, 5)
    idx, _, text = entry.partition("\t")
    assert idx == "0" and json.loads(text) == json.loads(ended.model_dump_json())

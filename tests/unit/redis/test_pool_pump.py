"""A pool's lines in ``pump.lua`` and ``health.lua``: the cheapest member with room takes each
line, the next one takes the overflow, and a member out of the batch or cooling down takes
nothing (a cooled-down one takes one probe line first)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from jobs.routing import queue_name
from tests.runtime_support import BATCH, put_line, record, text_client
from worker.lines.records import LineRecord, LineStatus
from worker.redis import keys
from worker.redis.pools import Breaker
from worker.redis.scheduling import Pumped
from worker.redis.state import State

POOL = ("cheap", "dear", "dearest")
LEASE = 30.0
FAST = 1000.0
BREAKER = Breaker(failures=3, cooldown_s=10.0, max_s=60.0)


@pytest.fixture
def state(redis_client: redis.Redis[bytes], redis_url: str) -> Iterator[State]:
    client = text_client(redis_url)
    try:
        yield State(client)
    finally:
        client.close()


def pool_lines(state: State, count: int, at: float, pool: tuple[str, ...] = POOL) -> None:
    for k in range(count):
        rec = record(k, provider=pool[0], pool=pool, queue=queue_name(pool))
        put_line(state, rec, score=at + k * 0.001)


def busy(state: State, provider: str, count: int, at: float) -> None:
    """``count`` of the provider's slots held by jobs of another batch, none due."""
    for k in range(count):
        rec = record(500 + k, batch="other", provider=provider, status=LineStatus.SUBMITTED)
        put_line(state, rec, score=at + 100)


def pump(state: State, provider: str, now: float, cap: int = 4) -> Pumped:
    return state.pump(provider, now, LEASE, polls=512, submits=512, defaults=(cap, FAST, FAST))


def taken(pumped: Pumped) -> list[int]:
    return [idx for _, idx, _ in pumped.submits]


def test_the_cheapest_member_with_room_takes_a_pool_s_lines_first(state: State) -> None:
    now = time.time()
    pool_lines(state, 3, now - 1)
    # Given every member was pumped once (so each knows the others' caps)
    for provider in POOL:
        pump(state, provider, now - 5)
    # When the dearer members pump before the cheapest
    assert taken(pump(state, "dearest", now)) == []
    assert taken(pump(state, "dear", now)) == []
    # Then the cheapest takes every line, and the line's record names it
    assert taken(pump(state, "cheap", now)) == [0, 1, 2]
    line = state.read(BATCH, 0)
    assert line is not None and (line.provider, line.status) == ("cheap", LineStatus.SUBMITTING)
    assert state.client.zcard(keys.flight("cheap")) == 3


def test_the_next_member_takes_the_overflow_when_the_cheapest_is_full(state: State) -> None:
    now = time.time()
    pool_lines(state, 10, now - 1)
    for provider in POOL:
        pump(state, provider, now - 5)
    assert len(taken(pump(state, "cheap", now, cap=4))) == 4
    # The cheapest is at its cap: the next one takes what it can, and the dearest the rest
    assert len(taken(pump(state, "dear", now, cap=4))) == 4
    assert len(taken(pump(state, "dearest", now, cap=4))) == 2
    assert state.client.zcard(keys.ready(BATCH, queue_name(POOL))) == 0


def test_a_member_whose_cheaper_member_has_not_pumped_yet_leaves_the_line_to_it(
    state: State,
) -> None:
    now = time.time()
    pool_lines(state, 2, now - 1)
    assert taken(pump(state, "dear", now)) == []
    assert taken(pump(state, "cheap", now)) == [0, 1]


def test_a_member_out_of_the_batch_s_pool_takes_nothing_and_holds_nothing_back(
    state: State,
) -> None:
    now = time.time()
    pool_lines(state, 2, now - 1)
    for provider in POOL:
        pump(state, provider, now - 5)
    assert state.leave_pool(BATCH, "cheap", "cheap answered 402: no credits")
    assert not state.leave_pool(BATCH, "cheap", "again")  # the first reason stays
    assert taken(pump(state, "cheap", now)) == []
    assert taken(pump(state, "dear", now)) == [0, 1]
    assert state.out_of_pool(BATCH) == {"cheap": "cheap answered 402: no credits"}


def test_a_member_cooling_down_submits_nothing_then_sends_one_probe(state: State) -> None:
    now = time.time()
    pool_lines(state, 4, now - 1)
    for provider in POOL:
        pump(state, provider, now - 5)
    # Given the cheapest failed three submits in a row: it cools down for 10 s
    changes = [state.verdict("cheap", False, now, BREAKER) for _ in range(3)]
    assert changes[:2] == ["", ""] and changes[2].startswith("cooling ")
    # Then it takes nothing, and its lines go to the next member
    assert taken(pump(state, "cheap", now)) == []
    assert taken(pump(state, "dear", now, cap=2)) == [0, 1]
    # When the cooldown is over, it sends one probe line, and no other until that one answers
    later = now + 11
    assert len(taken(pump(state, "cheap", later))) == 1
    assert taken(pump(state, "cheap", later + 1)) == []
    assert state.health("cheap").describe(later + 1) == "probing"
    # ... and once it answers it takes lines again
    assert state.verdict("cheap", True, later + 2, BREAKER) == "healthy"
    assert len(taken(pump(state, "cheap", later + 2))) == 1


def test_a_failed_probe_starts_a_cooldown_twice_as_long(state: State) -> None:
    now = time.time()
    for _ in range(3):
        state.verdict("cheap", False, now, BREAKER)
    assert state.health("cheap").until == pytest.approx(now + 10)
    assert state.verdict("cheap", False, now + 11, BREAKER).startswith("cooling ")
    assert state.health("cheap").until == pytest.approx(now + 11 + 20)


def test_answers_between_failures_keep_a_provider_out_of_cooldown(state: State) -> None:
    now = time.time()
    for _ in range(5):
        state.verdict("cheap", False, now, BREAKER)
        state.verdict("cheap", False, now, BREAKER)
        assert state.verdict("cheap", True, now, BREAKER) == ""
    assert state.health("cheap").until == 0


def test_a_pool_line_can_never_go_to_a_provider_outside_its_queue(state: State) -> None:
    now = time.time()
    pair = ("dear", "dearest")
    rec: LineRecord = record(0, provider="dear", pool=POOL, queue=queue_name(pair))
    put_line(state, rec, score=now - 1)
    for provider in POOL:
        pump(state, provider, now - 5)
    assert taken(pump(state, "cheap", now)) == []
    assert taken(pump(state, "dear", now)) == [0]

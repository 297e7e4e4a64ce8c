"""Groups in Redis: forming one from READY lines (``group_form.lua``), claiming due groups and
saving a task's work only while the group is its own (``claim``, ``group_save``), and
the scheduler's rule of when a group is formed (``worker.groups.form``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.runtime_support import put_line, record, runtime, seed_batch, text_client
from worker.groups.form import SETTLE_S, GroupDispatch
from worker.lines.groups import GroupStatus
from worker.lines.records import LineRecord, LineStatus
from worker.redis import keys
from worker.redis.state import State
from worker.runtime import Runtime

P = "openai-batch"
B = "b1"


@pytest.fixture
def state(redis_client: redis.Redis[bytes], redis_url: str) -> Iterator[State]:
    client = text_client(redis_url)
    try:
        yield State(client)
    finally:
        client.close()


def ready(state: State, count: int, at: float, start: int = 0, **request: Any) -> list[LineRecord]:
    recs = [
        record(start + k, provider=P, request={"quality": "low", **request}) for k in range(count)
    ]
    for rec in recs:
        put_line(state, rec, score=at)
    return recs


def test_a_group_takes_due_ready_lines_of_one_model_up_to_its_size(state: State) -> None:
    now = time.time()
    ready(state, 5, now - 10)
    ready(state, 2, now - 10, start=5, model="gpt-image-1-mini")
    ready(state, 3, now + 60, start=7)  # not due yet (a retry's backoff)

    taken = state.groups.form(B, P, "g1", 4, 10**9, now)

    assert taken == 4
    members = state.groups.members(B, "g1")
    assert members == {0: 1, 1: 1, 2: 1, 3: 1}
    for idx in members:
        line = state.read(B, idx)
        assert line is not None
        assert (line.status, line.group, line.seq, line.settled) == (LineStatus.GROUPED, "g1", 2, 2)
    group = state.groups.get(B, "g1")
    assert group is not None
    assert (group.status, group.size, group.model) == (GroupStatus.FORMED, 4, "gpt-image-1.5")
    assert state.client.zscore(keys.groups(P), group.member) == pytest.approx(now)
    assert state.client.smembers(keys.batch_groups(B)) == {"g1"}
    # the other model waits for its own group; line 4 for the next one
    left = state.client.zrange(keys.ready(B, P), 0, -1)
    assert left == [f"{B} {i}" for i in (4, 5, 6, 7, 8, 9)]
    assert state.groups.form(B, P, "g2", 10, 10**9, now) == 1  # line 4: the model of the first
    assert state.groups.form(B, P, "g3", 10, 10**9, now) == 2
    assert state.groups.get(B, "g3").model == "gpt-image-1-mini"  # type: ignore[union-attr]
    assert state.groups.form(B, P, "g4", 10, 10**9, now) == 0
    assert state.groups.get(B, "g4") is None
    assert state.groups.lines_in_groups(P) == 7


def test_a_group_stops_at_its_byte_budget_but_takes_at_least_one_line(state: State) -> None:
    now = time.time()
    recs = ready(state, 3, now - 1)
    one = len(recs[0].request_json) + 160

    assert state.groups.form(B, P, "g1", 10, 2 * one + 1, now) == 2
    assert state.groups.form(B, P, "g2", 10, 10, now) == 1  # bigger than the budget: alone
    assert state.client.sismember(keys.queues(P), B) == 0  # no READY line left for P


def test_a_claimed_group_gets_a_new_seq_and_a_lease_and_a_stale_save_changes_nothing(
    state: State,
) -> None:
    now = time.time()
    ready(state, 2, now - 1)
    state.groups.form(B, P, "g1", 10, 10**9, now)

    claimed, nxt = state.groups.claim(P, now, 30.0, 10)

    assert claimed == [(B, "g1", 2)] and nxt == pytest.approx(now + 30)
    rec = state.groups.begin(B, "g1", 2, "2:abc")
    assert rec is not None and rec.seq == 2
    assert state.groups.begin(B, "g1", 2, "2:def") is None  # a second copy of the dispatch
    assert state.groups.save(rec, now + 5, status=GroupStatus.RUNNING, job_id="batch_1")
    assert state.client.zscore(keys.groups(P), rec.member) == pytest.approx(now + 5)
    assert state.groups.save(rec, "keep", total=2)
    assert state.client.zscore(keys.groups(P), rec.member) == pytest.approx(now + 5)
    again, _ = state.groups.claim(P, now + 10, 30.0, 10)
    assert again == [(B, "g1", 3)]
    assert not state.groups.save(rec, "done")  # the older dispatch: stale
    latest = state.groups.get(B, "g1")
    assert latest is not None and latest.job_id == "batch_1" and latest.total == 2
    assert state.groups.save(latest.evolve(seq=3), "done")
    assert state.groups.get(B, "g1") is None and state.groups.members(B, "g1") == {}
    assert not state.client.exists(keys.groups(P), keys.batch_groups(B))


def test_a_group_of_a_purged_batch_is_dropped_when_claimed(state: State) -> None:
    state.client.zadd(keys.groups(P), {f"{B} gone": 0})
    assert state.groups.claim(P, time.time(), 30.0, 10) == ([], None)
    assert not state.client.exists(keys.groups(P))


# -- when the scheduler forms a group -------------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.groups: list[tuple[str, str, int]] = []

    def group(self, batch: str, group: str, seq: int) -> None:
        self.groups.append((batch, group, seq))


@pytest.fixture
def rt(redis_client: redis.Redis[bytes], redis_url: str) -> Iterator[Runtime]:
    made = runtime(
        redis_url,
        openai_api_key="sk-test",
        openai_base_url="http://127.0.0.1:9",
        openai_batch_group_size=4,
        openai_batch_max_in_flight=10,
    )
    try:
        yield made
    finally:
        made.close()


def seeded(rt: Runtime, total: int, cursor: int, admitted: int) -> None:
    seed_batch(rt.state, B, total=total, window=100, cursor_idx=cursor, admitted=admitted)


def test_a_full_group_is_formed_at_once_and_its_step_dispatched(rt: Runtime) -> None:
    now = time.time()
    seeded(rt, 100, cursor=9, admitted=9)
    ready(rt.state, 9, now)  # just admitted: more may come, but two groups are full
    sent = Sent()

    GroupDispatch(rt, sent).pump(P, now)

    assert [len(rt.state.groups.members(B, g)) for _, g, _ in sent.groups] == [4, 4]
    assert rt.state.client.zcard(keys.ready(B, P)) == 1  # short of a group: it settles


def test_a_short_group_waits_for_the_feeder_to_settle_unless_no_line_will_come(
    rt: Runtime,
) -> None:
    now = time.time()
    seeded(rt, 100, cursor=3, admitted=3)
    ready(rt.state, 3, now - 0.5)
    dispatch = GroupDispatch(rt, Sent())

    assert dispatch.form(P, now) == pytest.approx(SETTLE_S - 0.5)
    assert rt.state.groups.lines_in_groups(P) == 0
    assert dispatch.form(P, now + SETTLE_S) is None  # the feeder added none for SETTLE_S
    assert rt.state.groups.lines_in_groups(P) == 3
    # every line admitted: the last short group goes at once
    rt.state.set_batch(B, cursor_idx=100)
    ready(rt.state, 2, now, start=3)
    time.sleep(1.05)  # the runtime reads the batch record at most once a second
    dispatch.form(P, time.time())
    assert rt.state.groups.lines_in_groups(P) == 5


def test_groups_stay_within_the_provider_s_cap_of_lines_in_open_groups(rt: Runtime) -> None:
    now = time.time()
    seeded(rt, 12, cursor=12, admitted=12)
    ready(rt.state, 12, now - 5)

    GroupDispatch(rt, Sent()).form(P, now)

    assert rt.state.groups.lines_in_groups(P) == 10  # the cap: 4 + 4 + 2
    assert rt.state.client.zcard(keys.ready(B, P)) == 2


def test_an_interrupted_batch_forms_no_group(rt: Runtime) -> None:
    now = time.time()
    seeded(rt, 4, cursor=4, admitted=4)
    rt.state.set_batch(B, status="interrupted")
    ready(rt.state, 4, now - 5)

    GroupDispatch(rt, Sent()).form(P, now)

    assert rt.state.groups.lines_in_groups(P) == 0

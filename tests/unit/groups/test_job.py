"""A group's steps (``worker.groups.job``) against the simulator's Batch API over real HTTP, on
the suite's Redis and a local store: send, create (or find a lost one by metadata), poll,
wait out the enqueued limit, collect, cancel, and fall back; what reached the store, the rows,
and what the simulator's ledger says was bought."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs import policy
from jobs.output import groups as durable
from jobs.simulator import BatchConfig, Simulator, SimulatorConfig
from tests.runtime_support import put_line, record, runtime, seed_batch
from worker.batch import control
from worker.groups import job
from worker.lines.groups import GroupStatus
from worker.lines.records import LineStatus
from worker.redis import keys
from worker.runtime import Runtime

P = "openai-batch"
B = "b1"
FAST = BatchConfig(
    request_latency_s=0.02, concurrency=8, validating_s=0.05, finalizing_s=0.05, cancelling_s=0.1
)


@pytest.fixture(scope="module")
def _sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(sync_latency_s=0, image_mode="tiny", batch=FAST)) as sim:
        yield sim


@pytest.fixture
def sim(_sim: Simulator) -> Iterator[Simulator]:
    yield _sim
    _sim.reset()
    _sim.update(batch=FAST, image_mode="tiny")


@pytest.fixture
def no_waits() -> Iterator[None]:
    policy.set_testing(True)
    yield
    policy.set_testing(False)


def make(redis_url: str, sim: Simulator, **values: Any) -> Runtime:
    settings: dict[str, Any] = {
        "openai_api_key": "sk-test",
        "openai_base_url": sim.url_for("openai"),
        "openai_batch_poll_s": 0.05,
        "retry_base_s": 0.0,
        **values,
    }
    return runtime(redis_url, **settings)


@pytest.fixture
def rt(redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator) -> Iterator[Runtime]:
    made = make(redis_url, sim)
    try:
        yield made
    finally:
        made.close()


def start(rt: Runtime, out: Path, prompts: list[str], **meta: Any) -> None:
    """A running batch whose lines are READY for openai-batch, formed into one group."""
    seed_batch(rt.state, B, total=len(prompts), out=str(out), provider=P, **meta)
    now = time.time()
    for k, prompt in enumerate(prompts):
        request = {"prompt": prompt, "quality": "low", "size": "1024x1024"}
        put_line(rt.state, record(k, provider=P, request=request), score=now - 1)
    assert rt.state.groups.form(B, P, "g1", len(prompts), 10**9, now) == len(prompts)


def drive(rt: Runtime, until: float = 20.0, stop_at: GroupStatus | None = None) -> list[str]:
    """Run every group's due step until no group is left (or one reaches ``stop_at``)."""
    outcomes: list[str] = []
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        open_groups = rt.state.groups.of_batch(B)
        if not open_groups or (stop_at and any(g.status is stop_at for g in open_groups)):
            return outcomes
        claimed, _ = rt.state.groups.claim(P, time.time(), 30.0, 10)
        for batch, group, seq in claimed:
            outcomes.append(job.run(rt, batch, group, seq).outcome)
        time.sleep(0.02)
    raise AssertionError(f"groups still open: {rt.state.groups.of_batch(B)}; {outcomes}")


def rows(rt: Runtime) -> dict[str, dict[str, Any]]:
    found = {}
    for entry in rt.state.client.lrange(keys.rows(B), 0, -1):
        row = json.loads(entry.split("\t", 1)[1])
        found[row["id"]] = row
    return found


def billed(sim: Simulator) -> dict[str, float]:
    """What the simulator billed per line id (custom_id ``idx:attempt:id``), summed."""
    found: dict[str, float] = {}
    for request in sim.ledger()["openai_batch_requests"]:
        line = request["custom_id"].split(":", 2)[2]
        found[line] = found.get(line, 0.0) + request["billed"]
    return found


def test_a_group_is_sent_created_polled_and_collected_into_stored_images(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    start(rt, tmp_path, [f"a kettle {k}" for k in range(6)])

    outcomes = drive(rt)

    got = rows(rt)
    assert {row["status"] for row in got.values()} == {"succeeded"}, got
    assert all(row["credits"] == pytest.approx(0.0045) for row in got.values())
    assert all(row["job_id"].startswith("batch_req_") for row in got.values())
    assert all(row["submitted_at"] and row["attempts"] == 1 for row in got.values())
    stored = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert [p for p in stored if "/images/" in p] == [
        f"{B}/images/line-{k}/0.png" for k in range(6)
    ]
    ledger = sim.ledger()
    assert [b["metadata"] for b in ledger["openai_batches"]] == [
        {"imagebatch_batch": B, "imagebatch_group": "g1", "imagebatch_try": "1"}
    ]
    assert billed(sim) == {f"line-{k}": pytest.approx(0.0045) for k in range(6)}
    assert any(o.startswith("created") for o in outcomes) and outcomes[-1].startswith("collected")
    # the group is gone from Redis, and its record in the output store names its job
    assert rt.state.groups.of_batch(B) == [] and not rt.state.client.exists(keys.groups(P))
    record_ = durable.read(rt.store(str(tmp_path)), B, "g1")
    assert record_ is not None and record_.status == "collected"
    assert record_.job_id == ledger["openai_batches"][0]["id"]
    assert record_.members == [(k, 1) for k in range(6)]
    assert rt.state.counters(B)["done"] == 6


def test_a_create_whose_answer_is_lost_is_found_by_its_metadata_not_made_twice(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    sim.update(batch={"create_drops": 1})
    start(rt, tmp_path, ["a kettle 0", "a kettle 1"])

    outcomes = drive(rt)

    assert any("create unanswered" in o for o in outcomes), outcomes
    assert any(o.startswith("found again by its metadata") for o in outcomes), outcomes
    assert len(sim.ledger()["openai_batches"]) == 1
    assert {row["status"] for row in rows(rt).values()} == {"succeeded"}
    assert rt.state.counters(B)["group_jobs_found"] == 1


def test_a_400_and_a_content_refusal_fail_their_lines_with_the_reason_the_rest_succeed(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    start(rt, tmp_path, ["a kettle 0", "a kettle 1 [[policy]]", "a kettle 2"])
    # a field the endpoint refuses: only this request fails (a 400 in the error file)
    rt.state.client.hset(
        keys.line(B, 2),
        "request",
        json.dumps({"prompt": "a kettle 2", "provider_params": {"style": "vivid"}}),
    )

    drive(rt)

    got = rows(rt)
    assert got["line-0"]["status"] == "succeeded"
    policy_row, field_row = got["line-1"], got["line-2"]
    assert policy_row["status"] == field_row["status"] == "failed"
    assert policy_row["error"]["type"] == "content_policy"
    assert "safety system" in policy_row["error"]["message"]
    assert field_row["error"]["type"] == "provider_rejected"
    assert "style" in field_row["error"]["message"]
    assert billed(sim) == {"line-0": pytest.approx(0.0045), "line-1": 0, "line-2": 0}


@pytest.mark.usefixtures("no_waits")
def test_a_5xx_line_gets_a_new_attempt_in_a_later_group(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    start(rt, tmp_path, ["a kettle 0 [[fail-once]]", "a kettle 1"])

    drive(rt)

    line = rt.state.read(B, 0)
    assert line is not None and line.status is LineStatus.READY and line.attempt == 2
    assert line.group == "" and line.submitted_at
    assert rows(rt)["line-1"]["status"] == "succeeded"
    # the scheduler puts it in the next group; that one buys it
    assert rt.state.groups.form(B, P, "g2", 10, 10**9, time.time() + 1) == 1
    drive(rt)
    got = rows(rt)["line-0"]
    assert (got["status"], got["attempts"]) == ("succeeded", 2)
    assert billed(sim)["line-0"] == pytest.approx(0.0045)  # the 500 was not billed


def test_an_expired_batch_s_unfinished_lines_go_to_a_later_group_and_its_finished_ones_stay(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    # one request at a time, each 0.3 s, in a window of 0.5 s: the first finishes, not the rest
    sim.update(batch={"concurrency": 1, "request_latency_s": 0.3, "window_s": 0.5})
    start(rt, tmp_path, [f"a kettle {k}" for k in range(4)])

    drive(rt)

    ledger = sim.ledger()
    assert [b["status"] for b in ledger["openai_batches"]] == ["expired"]
    got = rows(rt)
    assert len(got) == 1 and next(iter(got.values()))["status"] == "succeeded"
    waiting = [rt.state.read(B, k) for k in range(4)]
    again = [line for line in waiting if line is not None]
    assert len(again) == 3 and all(line.status is LineStatus.READY for line in again)
    assert all(line.attempt == 2 and line.group == "" for line in again)
    # ...and they finish in the next group, bought once each
    sim.update(batch={"concurrency": 8, "request_latency_s": 0.02, "window_s": 3600.0})
    assert rt.state.groups.form(B, P, "g2", 10, 10**9, time.time() + 0.1) == 3
    drive(rt)
    assert {row["status"] for row in rows(rt).values()} == {"succeeded"}
    assert billed(sim) == {f"line-{k}": pytest.approx(0.0045) for k in range(4)}


def test_a_batch_refused_for_the_enqueued_limit_waits_and_is_created_again(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    # an account that may have one image enqueued: a group of two is refused, fails nothing
    sim.update(batch={"enqueued_limit": 1})
    start(rt, tmp_path, ["a kettle 0", "a kettle 1"])

    drive(rt, stop_at=GroupStatus.WAITING)
    assert rows(rt) == {}
    sim.update(batch={"enqueued_limit": None})
    drive(rt)

    ledger = sim.ledger()
    assert [b["status"] for b in ledger["openai_batches"]] == ["failed", "completed"]
    assert [b["metadata"]["imagebatch_try"] for b in ledger["openai_batches"]] == ["1", "2"]
    assert {row["status"] for row in rows(rt).values()} == {"succeeded"}
    assert durable.jobs_used(rt.store(str(tmp_path)), B) == (1, 1)


def test_a_cancelled_batch_cancels_its_job_keeps_what_finished_and_fails_the_rest(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    sim.update(batch={"concurrency": 1, "request_latency_s": 0.6})
    start(rt, tmp_path, [f"a kettle {k}" for k in range(6)])
    drive(rt, stop_at=GroupStatus.RUNNING)
    time.sleep(0.3)  # the first requests finish while the runtime reads the batch record anew

    assert control.cancel(rt, B)  # `imagebatch cancel`: the group looks at once
    group = rt.state.groups.get(B, "g1")
    assert group is not None
    assert (rt.state.client.zscore(keys.groups(P), group.member) or 0) <= time.time()
    time.sleep(1.05)  # the runtime reads the batch record at most once a second
    drive(rt)

    assert [b["status"] for b in sim.ledger()["openai_batches"]] == ["cancelled"]
    got = rows(rt)
    done = [row for row in got.values() if row["status"] == "succeeded"]
    failed = [row for row in got.values() if row["status"] == "failed"]
    assert done and failed and len(got) == 6
    assert {row["error"]["type"] for row in failed} == {"cancelled"}
    assert {k for k, v in billed(sim).items() if v} == {row["id"] for row in done}


def test_an_unfinished_line_goes_to_the_synchronous_api_when_the_user_allows_it(
    redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator, tmp_path: Path
) -> None:
    rt = make(redis_url, sim, openai_batch_fallback=True)
    try:
        start(rt, tmp_path, ["a kettle 0 [[fail-once]]", "a kettle 1"])
        drive(rt)
        line = rt.state.read(B, 0)
        assert line is not None
        assert (line.status, line.provider, line.attempt) == (LineStatus.READY, "openai", 2)
        assert rt.state.client.zscore(keys.ready(B, "openai"), line.member) is not None
        assert "openai" in rt.state.providers()
        assert rt.state.counters(B)["fallbacks"] == 1
    finally:
        rt.close()


def test_a_group_of_an_interrupted_batch_is_not_sent_until_the_resume(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    start(rt, tmp_path, ["a kettle 0"], status="interrupted")
    claimed, _ = rt.state.groups.claim(P, time.time(), 30.0, 10)

    outcome = job.run(rt, *claimed[0])

    assert outcome.outcome.startswith("held")
    assert sim.ledger()["openai_batches"] == []
    group = rt.state.groups.get(B, "g1")
    assert group is not None and group.status is GroupStatus.FORMED
    assert (rt.state.client.zscore(keys.groups(P), group.member) or 0) > time.time() + 600


def test_a_job_the_account_may_no_longer_read_is_not_bought_again_its_lines_wait(
    redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator, tmp_path: Path
) -> None:
    rt = make(redis_url, sim)
    other = make(redis_url, sim, openai_api_key="sk-another-account")
    try:
        start(rt, tmp_path, ["a kettle 0"])
        drive(rt, stop_at=GroupStatus.RUNNING)
        claimed, _ = other.state.groups.claim(P, time.time() + 3600, 30.0, 10)

        outcome = job.run(other, *claimed[0])  # 404: no such batch, for this key

        assert outcome.outcome.startswith("refused (provider_rejected)")
        group = other.state.groups.get(B, "g1")
        assert group is not None and group.status is GroupStatus.RUNNING
        line = other.state.read(B, 0)
        assert line is not None and line.status is LineStatus.GROUPED
        drive(rt)  # the right account collects it
        assert rows(rt)["line-0"]["status"] == "succeeded"
        assert len(sim.ledger()["openai_batches"]) == 1
    finally:
        rt.close()
        other.close()

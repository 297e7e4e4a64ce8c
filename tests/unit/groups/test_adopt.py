"""A resume after Redis was lost (``start_batch`` → ``worker.groups.adopt``): the lines of a
group saved in the output store go back into that group, which polls its OpenAI batch (its id
was saved) or finds it by metadata (its create's answer was lost) instead of sending them
again; and a budget holds for lines sent in groups."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs.manifest.spool import spool
from jobs.output import groups as durable
from jobs.simulator import Simulator, SimulatorConfig
from tests.unit.groups.test_job import FAST, drive, make, rows
from worker.batch import start
from worker.batch.budget import Budget
from worker.groups.form import GroupDispatch
from worker.lines.groups import GroupStatus
from worker.lines.records import LineStatus
from worker.runtime import Runtime

P = "openai-batch"
B = "b1"


class Sent:
    def group(self, batch: str, group: str, seq: int) -> None:
        pass


@pytest.fixture
def rt(redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator) -> Iterator[Runtime]:
    made = make(redis_url, sim, openai_batch_group_size=3)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(image_mode="tiny", batch=FAST)) as made:
        yield made


def begin(rt: Runtime, out: Path, count: int) -> start.Started:
    source = out.parent / "kettles.jsonl"
    lines = [{"id": f"k{i}", "prompt": f"a kettle {i}", "quality": "low"} for i in range(count)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    spooled = spool([source.read_bytes()])
    try:
        return start.start_batch(rt, spooled, batch=B, out=str(out), provider=P)
    finally:
        Path(spooled.path).unlink()


def form(rt: Runtime) -> None:
    time.sleep(1.05)  # the runtime reads the batch record at most once a second
    GroupDispatch(rt, Sent()).form(P, time.time())


def wipe(rt: Runtime) -> None:
    rt.state.client.flushall()
    time.sleep(1.05)


@pytest.mark.parametrize("lost_answer", [False, True], ids=["job-id-saved", "create-answer-lost"])
def test_a_wiped_redis_gets_its_groups_back_from_the_output_store_and_buys_nothing_twice(
    rt: Runtime, sim: Simulator, tmp_path: Path, lost_answer: bool
) -> None:
    # Given a batch of 5 lines in groups of 3 whose OpenAI batches were created (the first's
    # create answer lost, in one variant) and are running, slowly
    sim.update(batch={"request_latency_s": 0.5, "concurrency": 1, "create_drops": int(lost_answer)})
    out = tmp_path / "out"
    begin(rt, out, 5)
    form(rt)
    assert sorted(g.size for g in rt.state.groups.of_batch(B)) == [2, 3]
    stop = GroupStatus.CREATING if lost_answer else GroupStatus.RUNNING
    drive(rt, stop_at=stop)
    made = [b["id"] for b in sim.ledger()["openai_batches"]]
    assert made

    # When Redis is wiped and the batch started again from what the output store holds
    wipe(rt)
    again = begin(rt, out, 5)

    # Then every line in a saved group is back in it, none READY to be sent again...
    saved = list(durable.records(rt.store(str(out)), B))
    assert len(saved) == len(made) and again.adopted == sum(len(r.members) for r in saved)
    groups = rt.state.groups.of_batch(B)
    assert {g.status for g in groups} <= {GroupStatus.RUNNING, GroupStatus.CREATING}
    for group in groups:
        for idx in rt.state.groups.members(B, group.id):
            line = rt.state.read(B, idx)
            assert line is not None and line.status is LineStatus.GROUPED
            assert line.group == group.id
    # ...and the batch finishes with each line bought once, by the batches made before
    form(rt)
    drive(rt, until=30)
    assert {row["status"] for row in rows(rt).values()} == {"succeeded"}
    assert len(rows(rt)) == 5
    ledger = sim.ledger()
    assert [b["id"] for b in ledger["openai_batches"]][: len(made)] == made
    assert len(ledger["openai_batches"]) == 2
    billed = [
        r["custom_id"].split(":", 2)[2] for r in ledger["openai_batch_requests"] if r["billed"]
    ]
    assert sorted(billed) == [f"k{i}" for i in range(5)]


def test_lines_over_the_budget_fail_before_their_group_is_sent(
    rt: Runtime, sim: Simulator, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    source = tmp_path / "kettles.jsonl"
    lines = [{"id": f"k{i}", "prompt": f"a kettle {i}", "quality": "low"} for i in range(3)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    spooled = spool([source.read_bytes()])
    try:  # 0.0045 USD each: a budget of 0.01 takes two
        start.start_batch(
            rt, spooled, batch=B, out=str(out), provider=P, budget=Budget(0.01, usd=True)
        )
    finally:
        Path(spooled.path).unlink()
    form(rt)

    drive(rt)

    got = rows(rt)
    assert sorted(row["status"] for row in got.values()) == ["failed", "succeeded", "succeeded"]
    (over,) = [row for row in got.values() if row["status"] == "failed"]
    assert over["error"]["type"] == "budget" and over["attempts"] == 0
    (job,) = sim.ledger()["openai_batches"]
    assert job["request_counts"]["total"] == 2

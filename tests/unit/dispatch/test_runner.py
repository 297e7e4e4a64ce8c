"""A task's lines, one after another: each line's counts land with its transition, so a batch
finalized while the task still runs (its last line ended in another task) counts them all."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.runtime_support import BATCH, put_line, record, runtime, seed_batch
from worker.dispatch import runner
from worker.dispatch.runner import Runner
from worker.lines.records import LineRecord, LineStatus, Step, Transition
from worker.lines.steps import Context
from worker.runtime import Runtime


@pytest.fixture
def rt(redis_url: str, redis_client: redis.Redis[Any]) -> Iterator[Runtime]:
    with Simulator(SimulatorConfig(latency_s=5.0)) as sim:
        made = runtime(redis_url, simulator_base_url=sim.base_url)
        try:
            yield made
        finally:
            made.close()


def test_a_line_s_counts_are_in_the_batch_s_counters_before_its_task_ends(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task of three submits, each line's step noting what the batch's counters said
    seed_batch(rt.state, total=3, window=3)
    lines = [record(idx, provider="simulator", status=LineStatus.SUBMITTING) for idx in range(3)]
    for rec in lines:
        put_line(rt.state, rec)
    submit = runner.STEP_FUNCTIONS[Step.SUBMIT]
    seen: list[tuple[float, float]] = []

    def noting(ctx: Context, rec: LineRecord) -> Transition:
        counts = rt.state.counters(BATCH)
        seen.append((counts.get("submit_requests", 0.0), counts.get("jobs_accepted", 0.0)))
        return submit(ctx, rec)

    monkeypatch.setitem(runner.STEP_FUNCTIONS, Step.SUBMIT, noting)
    # When the task runs them
    report = Runner(rt).run(Step.SUBMIT, BATCH, [(rec.idx, rec.seq) for rec in lines])
    # Then each line found the lines before it counted: a finalize reading the counters
    # while the task still ran would have found them too
    assert report.outcomes["accepted"] == 3, report.outcomes
    assert seen == [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)]
    assert rt.state.counters(BATCH)["jobs_accepted"] == 3

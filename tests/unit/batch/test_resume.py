"""Resuming: whatever status a crash leaves a line in, the scheduler knows its next step (the
defect: a line left as ``"new"`` made the resume fail with ``KeyError``), and a resume after
Redis is wiped reads what earlier runs stored from the part files, in bulk."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from jobs.errors import ConfigError
from jobs.manifest.spool import spool
from jobs.output import layout, parts
from jobs.settings import Settings
from jobs.storage import LocalStore
from tests import runtime_support
from tests.runtime_support import record_reads
from worker import runtime
from worker.batch import finish, start
from worker.dispatch.scheduler import Scheduler
from worker.lines.records import ACTIVE, TABLE, LineRecord, LineStatus, Step, first_seq
from worker.redis import keys
from worker.runtime import Runtime


class Recorded:
    """The scheduler's dispatch boundary, recorded instead of sent to Celery."""

    def __init__(self) -> None:
        self.steps: list[tuple[Step, str, list[tuple[int, int]]]] = []
        self.batch_tasks: list[tuple[str, str]] = []

    def step(self, step: Step, batch: str, lines: Sequence[tuple[int, int]]) -> None:
        self.steps.append((step, batch, list(lines)))

    def batch_task(self, name: str, batch: str) -> None:
        self.batch_tasks.append((name, batch))

    def group(self, batch: str, group: str, seq: int) -> None:
        self.batch_tasks.append(("group", batch))


@pytest.fixture
def rt(redis_url: str, redis_client: redis.Redis[Any], tmp_path: Path) -> Iterator[Runtime]:
    # Per-provider fields are generated from the registry: mypy does not know them.
    apiframe: dict[str, Any] = {
        "apiframe_api_key": SecretStr("afk_resume_test"),
        "apiframe_base_url": "http://127.0.0.1:9",
    }
    settings = Settings(broker_url=redis_url, **apiframe, out=str(tmp_path / "out"))
    made = runtime.configure(settings)
    try:
        yield made
    finally:
        runtime.reset()


def manifest(path: Path, count: int) -> Path:
    lines = [{"id": f"cup-{i}", "prompt": f"A tea cup, style {i}"} for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("status", sorted(ACTIVE - {LineStatus.GROUPED}))
def test_a_line_left_in_any_status_is_dispatched_for_the_step_that_status_needs(
    rt: Runtime, tmp_path: Path, status: LineStatus
) -> None:
    # Given a batch whose one line a crash left in `status`, its lease long run out
    source = manifest(tmp_path / "cups.jsonl", 1)
    spooled = spool([source.read_bytes()])
    started = start.start_batch(
        rt, spooled, batch="cups", out=str(tmp_path / "out"), provider="apiframe"
    )
    Path(spooled.path).unlink()
    assert started.plan.valid == 1
    rec = LineRecord.from_hash("cups", 0, rt.state.client.hgetall(keys.line("cups", 0)))
    client = rt.state.client
    client.zrem(keys.ready("cups", "apiframe"), rec.member)
    client.hset(keys.line("cups", 0), mapping={"status": status.value, "job_id": "j-1"})
    home = {
        "ready": keys.ready("cups", "apiframe"),
        "flight": keys.flight("apiframe"),
        "store": keys.STORE,
    }
    client.zadd(home[TABLE[status].home.value], {rec.member: time.time() - 60})
    # When the scheduler looks
    dispatch = Recorded()
    Scheduler(rt, dispatch).tick(frozenset({"batch"}))
    # Then it sends the one step that status needs, for that line, under a new seq
    expected = TABLE[status].step
    assert [(step, batch, [idx for idx, _ in lines]) for step, batch, lines in dispatch.steps] == [
        (expected, "cups", [0])
    ]
    seq = dispatch.steps[0][2][0][1]
    stored = client.hget(keys.line("cups", 0), "seq")
    assert stored is not None
    assert seq == int(stored)


def test_every_status_has_a_next_step_or_is_terminal() -> None:
    assert set(TABLE) == set(LineStatus)
    for status, info in TABLE.items():
        assert (info.step is None) == info.terminal, status
        assert info.terminal == (status in {"succeeded", "failed", "rejected"}), status


def test_a_resume_reads_every_part_file_once_and_retries_only_the_failed_lines(
    rt: Runtime, tmp_path: Path
) -> None:
    # Given a batch whose earlier run left part files: lines 0-4 succeeded, 5 failed
    source = manifest(tmp_path / "cups.jsonl", 8)
    out = tmp_path / "out"
    store = rt.store(str(out))
    rows = {}
    for idx in range(6):
        status = "succeeded" if idx < 5 else "failed"
        row = {
            "line": idx + 1,
            "id": f"cup-{idx}",
            "status": status,
            "provider": "apiframe",
            "attempts": 1,
            "credits": 4.0 if status == "succeeded" else 0.0,
            "images": [],
            "error": None if status == "succeeded" else {"type": "job_failed", "message": "x"},
        }
        rows[idx] = json.dumps(row)
    parts.write_part(store, "cups", 0, rows)
    reads = record_reads(store)
    # When the batch is started again (Redis knows nothing of it)
    spooled = spool([source.read_bytes()])
    started = start.start_batch(rt, spooled, batch="cups", out=str(out), provider="apiframe")
    Path(spooled.path).unlink()
    # Then the part file was read once, 5 lines are carried over, 1 retried with attempt 2,
    # and only the 3 lines without a stored success are in the window
    assert reads.count(layout.part_key("cups", 0)) == 1
    assert (started.carried, started.retrying) == (5, 1)
    admitted = {rec.idx: rec for rec in rt.state.lines("cups")}
    assert sorted(admitted) == [5, 6, 7]
    assert admitted[5].attempt == 2 and admitted[6].attempt == 1
    assert int(float(rt.state.counters("cups")["done"])) == 5


def test_a_step_that_outlives_its_lease_cannot_undo_the_copy_that_took_over(
    rt: Runtime, tmp_path: Path
) -> None:
    """The defect: a lease was released with a plain DEL, so a step that outlived its lease
    deleted the lease of the copy that took over. Now a dispatch's seq is its lease token."""
    from worker.lines.records import Transition

    source = manifest(tmp_path / "cups.jsonl", 1)
    spooled = spool([source.read_bytes()])
    start.start_batch(rt, spooled, batch="cups", out=str(tmp_path / "out"), provider="apiframe")
    Path(spooled.path).unlink()
    state, member = rt.state, keys.member("cups", 0)
    # Given a submit dispatched to a worker that then stalls past its lease...
    first = state.pump("apiframe", time.time(), 30, polls=4, submits=4, defaults=(4, 4.0, 4.0))
    ((_, _, seq1),) = first.submits
    slow = state.begin("cups", 0, seq1, f"{seq1}:slow")
    assert slow is not None
    state.client.zadd(keys.flight("apiframe"), {member: time.time() - 1})
    # ...so the scheduler dispatches the line again, and the new copy begins
    second = state.pump("apiframe", time.time(), 30, polls=4, submits=4, defaults=(4, 4.0, 4.0))
    ((_, _, seq2, status),) = second.polls
    assert seq2 == seq1 + 1 and status is LineStatus.SUBMITTING
    fresh = state.begin("cups", 0, seq2, f"{seq2}:fresh")
    assert fresh is not None
    lease = state.client.zscore(keys.flight("apiframe"), member)
    # When the stalled step finally finishes and tries to record its outcome
    late = Transition(LineStatus.SUBMITTED, {"job_id": "from-the-slow-copy"}, due_in=1.0)
    applied = state.apply(slow, late, model="gpt-image-1.5", index_jobs=False)
    # Then nothing happens: the line, its owner and the new copy's lease are untouched
    assert not applied.applied
    line = state.client.hgetall(keys.line("cups", 0))
    assert line["owner"] == f"{seq2}:fresh" and line.get("job_id", "") == ""
    assert state.client.zscore(keys.flight("apiframe"), member) == lease
    # ...and a second copy of the new dispatch cannot begin while the first holds it
    assert state.begin("cups", 0, seq2, f"{seq2}:duplicate") is None


def test_a_resume_reads_part_files_only_a_few_ahead_of_what_it_has_counted(
    tmp_path: Path,
) -> None:
    # Given 200 part files (a big batch's worth, each standing for a thousand rows)
    store = LocalStore(str(tmp_path))
    for chunk in range(200):
        parts.write_part(store, "big", chunk, {chunk * 1000: json.dumps({"status": "failed"})})
    fetched = record_reads(store)
    # When a resume has counted the first part's rows and paused
    reading = parts.read_parts(store, "big", threads=4)
    first = next(reading)
    time.sleep(0.5)
    # Then only a few parts were fetched ahead of it (memory does not grow with the batch),
    # and the rest still arrive, each once and in order
    assert first == {0: json.dumps({"status": "failed"})}
    assert len(fetched) <= 2 * 4 + 1
    rest = list(reading)
    assert [min(part) for part in rest] == [chunk * 1000 for chunk in range(1, 200)]
    assert len(fetched) == 200


def test_a_resume_carries_the_counters_an_interrupted_run_saved_and_recounts_the_rows(
    rt: Runtime, tmp_path: Path
) -> None:
    """The defect: a resume after Ctrl-C counted submits, jobs and polls afresh, so the summary
    of a batch that paid for 300 jobs said 124."""
    source = manifest(tmp_path / "cups.jsonl", 4)
    out = tmp_path / "out"
    spooled = spool([source.read_bytes()])
    start.start_batch(rt, spooled, batch="cups", out=str(out), provider="apiframe")
    # Given the first run bought, polled, stored one line and was interrupted (its last flush
    # saved its counters, and the seconds it worked)
    rt.state.add_counts("cups", submit_requests=3, jobs_accepted=3, polls=5, throttled=1)
    row = {"line": 1, "id": "cup-0", "status": "succeeded", "provider": "apiframe", "credits": 4}
    rt.state.client.rpush(keys.rows("cups"), f"0\t{json.dumps(row)}")
    rt.state.add_counts("cups", done=1, succeeded=1, **{"credits:apiframe credits": 4.0})
    rt.state.set_batch("cups", run_started=time.time() - 30)
    finish.flush(rt, "cups")
    rt.state.client.flushall()  # the embedded Redis went with the run
    # When the same command runs again
    started = start.start_batch(rt, spooled, batch="cups", out=str(out), provider="apiframe")
    Path(spooled.path).unlink()
    # Then what the first run sent adds up with what this one will send; the rows' counts are
    # recounted from the part files (not added twice); the time worked carries over
    counts = rt.state.counters("cups")
    assert started.carried == 1
    assert {k: counts[k] for k in ("submit_requests", "jobs_accepted", "polls", "throttled")} == {
        "submit_requests": 3.0,
        "jobs_accepted": 3.0,
        "polls": 5.0,
        "throttled": 1.0,
    }
    assert (counts["done"], counts["succeeded"], counts["credits:apiframe credits"]) == (1, 1, 4)
    assert 30 <= float(rt.state.batch("cups")["elapsed_before"]) < 40
    assert rt.state.batch("cups")["runs"] == "2"


def test_resuming_a_batch_on_another_provider_is_refused(rt: Runtime, tmp_path: Path) -> None:
    source = manifest(tmp_path / "cups.jsonl", 2)
    out = str(tmp_path / "out")
    spooled = spool([source.read_bytes()])
    start.start_batch(rt, spooled, batch="cups", out=out, provider="apiframe")
    # Running in Redis, or only in the output store: either way its lines were apiframe's
    for forget in (False, True):
        if forget:
            rt.state.client.flushall()
        with pytest.raises(
            ConfigError, match="with --provider apiframe, not simulator: pass --provider apiframe"
        ):
            start.start_batch(rt, spooled, batch="cups", out=out, provider="simulator")
    Path(spooled.path).unlink()


def test_a_hold_decided_before_a_resume_but_applied_after_it_does_not_keep_the_line_held(
    rt: Runtime, tmp_path: Path
) -> None:
    """The defect: after ``submit … --batch-id`` resumed an interrupted batch, a line stayed
    held, due an hour ahead: a submit task that had read the batch as interrupted applied its
    hold after the resume had released the window."""
    from worker.batch import control
    from worker.dispatch.runner import Runner

    source = manifest(tmp_path / "cups.jsonl", 3)
    spooled = spool([source.read_bytes()])
    try:
        out = str(tmp_path / "out")
        first = start.start_batch(
            rt, spooled, batch="cups", out=out, provider="apiframe", owner="run-1"
        )
        assert first.owner == "run-1"
        # Given an interrupted batch whose submits were dispatched, and a worker that read the
        # batch's record (interrupted) just before the resume
        assert control.interrupt(rt, "cups", "run-1")
        pumped = rt.state.pump(
            "apiframe", time.time(), 30, polls=0, submits=4, defaults=(4, 10.0, 10.0)
        )
        assert len(pumped.submits) == 3
        assert rt.batch_meta("cups")["status"] == "interrupted"
        # When the batch is resumed (by a submit: no owner), and only then do those submits run
        resumed = start.start_batch(rt, spooled, batch="cups", out=out, provider="apiframe")
        assert resumed.attached and resumed.owner is None
        report = Runner(rt).run(Step.SUBMIT, "cups", [(idx, seq) for _, idx, seq in pumped.submits])
    finally:
        Path(spooled.path).unlink()
    # Then each line was held by that stale read, and is due now all the same
    assert report.outcomes["held"] >= 3, report.outcomes  # (a freed slot may run one more)
    due = dict(rt.state.client.zrange(keys.ready("cups", "apiframe"), 0, -1, withscores=True))
    assert len(due) == 3 and max(due.values()) <= time.time() + 1, due
    # ... and the run that interrupted it no longer owns it: its token stops nothing
    assert not control.interrupt(rt, "cups", "run-1")
    assert rt.state.batch_status("cups") == "running"


def test_a_task_of_a_new_run_of_a_batch_id_reads_that_runs_record_not_the_earlier_one(
    redis_url: str, redis_client: redis.Redis[bytes]
) -> None:
    # Given a worker that read batch mugs' record (output /first) for a task of its lines
    rt = runtime_support.runtime(redis_url)
    try:
        rt.state.set_batch("mugs", out="/first")
        earlier = first_seq(time.time()) + 2
        time.sleep(0.01)
        assert rt.batch_meta("mugs", [earlier])["out"] == "/first"
        # When, within the second it keeps that record, a new run of mugs (output /second)
        # admits its lines and one of them reaches the worker
        rt.state.set_batch("mugs", out="/second")
        time.sleep(0.01)
        later = first_seq(time.time()) + 1
        # Then that task works with the new run's record; one of the earlier lines may still
        # use the one it read
        assert rt.batch_meta("mugs", [later])["out"] == "/second"
    finally:
        rt.close()

"""Celery tasks: thin glue around the runner, the feeder and the batch's ending.

A step task carries a group of lines (``[[index, seq], ...]``) of one batch; the scheduler
sends only work that can run now. Each task is safe to run twice or late: the runner skips
lines whose seq moved on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from jobs.errors import ImagebatchError, StorageError
from worker import runtime
from worker.batch import control, feeder, finish
from worker.celery.app import app
from worker.dispatch.runner import Runner
from worker.groups import job as group_job
from worker.lines.records import Step
from worker.redis.keys import QUEUE

log = logging.getLogger(__name__)


class LinesFailed(ImagebatchError):
    """Some lines of this task ended ``failed``: the task shows as failed (Flower, events)."""

    type = "lines_failed"


def _run(step: Step, batch: str, lines: Sequence[Sequence[int]]) -> dict[str, object]:
    rt = runtime.current()
    report = Runner(rt, rt.heartbeat).run(step, batch, [(int(idx), int(seq)) for idx, seq in lines])
    for ended in sorted(report.last):
        send_finalize(ended)
    if report.failed:
        raise LinesFailed(f"batch {batch}: lines failed: {', '.join(report.failed)}")
    return report.as_result()


@app.task(name="imagebatch.submit", throws=(LinesFailed,))
def submit(batch: str, lines: list[list[int]]) -> dict[str, object]:
    return _run(Step.SUBMIT, batch, lines)


@app.task(name="imagebatch.poll", throws=(LinesFailed,))
def poll(batch: str, lines: list[list[int]]) -> dict[str, object]:
    return _run(Step.POLL, batch, lines)


@app.task(name="imagebatch.store", throws=(LinesFailed,))
def store(batch: str, lines: list[list[int]]) -> dict[str, object]:
    return _run(Step.STORE, batch, lines)


@app.task(name="imagebatch.feed")
def feed(batch: str) -> int:
    return feeder.feed(runtime.current(), batch)


@app.task(name="imagebatch.flush")
def flush(batch: str) -> int:
    try:
        return finish.flush(runtime.current(), batch)
    except StorageError as exc:
        # The rows stay in Redis; the scheduler sends the flush again.
        log.warning("batch %s: waiting for storage to write rows: %s", batch, exc.message)
        return 0


@app.task(name="imagebatch.drain")
def drain(batch: str) -> int:
    return control.drain(runtime.current(), batch)


@app.task(name="imagebatch.finalize")
def finalize(batch: str) -> dict[str, Any] | None:
    try:
        return finish.finalize(runtime.current(), batch)
    except StorageError as exc:
        log.warning("batch %s: waiting for storage to finalize: %s", batch, exc.message)
        return None


@app.task(name="imagebatch.group")
def group(batch: str, group_id: str, seq: int) -> dict[str, object]:
    """One step of a group provider's group (send, create, poll, collect)."""
    done = group_job.run(runtime.current(), batch, group_id, int(seq))
    for ended in sorted(done.last):
        send_finalize(ended)
    return done.as_result()


STEP_TASKS: dict[Step, Any] = {Step.SUBMIT: submit, Step.POLL: poll, Step.STORE: store}
BATCH_TASKS: dict[str, Any] = {"feed": feed, "flush": flush, "drain": drain, "finalize": finalize}


def send_finalize(batch: str) -> None:
    finalize.apply_async((batch,), queue=QUEUE)


class CeleryDispatch:
    """The scheduler's ``Dispatch``: every decision becomes a task on the one queue."""

    def step(self, step: Step, batch: str, lines: Sequence[tuple[int, int]]) -> None:
        STEP_TASKS[step].apply_async((batch, [list(line) for line in lines]), queue=QUEUE)

    def batch_task(self, name: str, batch: str) -> None:
        BATCH_TASKS[name].apply_async((batch,), queue=QUEUE)

    def group(self, batch: str, group_id: str, seq: int) -> None:
        group.apply_async((batch, group_id, seq), queue=QUEUE)

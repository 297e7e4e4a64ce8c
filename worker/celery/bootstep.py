"""imagebatch's threads in every Celery worker, however it was started (``imagebatch worker``,
the embedded run, ``celery -A worker.app worker``): the metrics endpoint, the lease keeper
and the scheduler, which one worker of the fleet leads at a time. Each way of starting a
worker calls ``install``; commands that only send tasks never load any of it."""

from __future__ import annotations

import socket
from typing import Any

from celery import Celery, bootsteps

from worker import runtime
from worker.celery import tasks
from worker.dispatch.lease import Heartbeat
from worker.dispatch.scheduler import SchedulerThread
from worker.observability import metrics


class ImagebatchStep(bootsteps.StartStopStep):
    """imagebatch's threads in every worker: the scheduler (leader-elected) and the heartbeat."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.threads: list[Any] = []

    def start(self, parent: Any) -> None:
        rt = runtime.current()
        heartbeat = Heartbeat(rt, socket.gethostname())
        rt.heartbeat = heartbeat
        # The metrics endpoint first: a port that is taken fails before anything else starts.
        self.threads = [
            metrics.Exporter(rt),
            heartbeat,
            SchedulerThread(rt, tasks.CeleryDispatch()),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self, parent: Any) -> None:
        for thread in self.threads:
            thread.stop()
        self.threads = []

    def terminate(self, parent: Any) -> None:
        self.stop(parent)


def install(app: Celery) -> Celery:
    """Run imagebatch's threads in every worker this app starts (idempotent)."""
    app.steps["worker"].add(ImagebatchStep)
    return app

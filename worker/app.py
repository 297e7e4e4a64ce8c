"""The Celery app, configured from imagebatch's settings wherever it is loaded: by
``imagebatch worker``, by the embedded run, or by ``celery -A worker.app …`` (inspect,
control, events, flower), which all read ``IMAGEBATCH_BROKER_URL``.

Every worker, however it was started, consumes the ``imagebatch`` queue and runs imagebatch's
own threads (``ImagebatchStep``): the scheduler, which one worker leads at a time, and the
heartbeat that keeps this worker's running steps leased. Task events are on, so Flower and
``celery events`` see every task; a task whose lines failed is a failed task.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import Celery, bootsteps
from pydantic import ValidationError

from jobs.settings import CoreSettings, Settings

QUEUE = "imagebatch"
log = logging.getLogger(__name__)

app = Celery("imagebatch", set_as_current=False, include=["worker.tasks", "worker.inbox"])
app.conf.update(
    task_default_queue=QUEUE,
    # Redelivery is not what recovers lost work (every dispatched line carries a lease the
    # scheduler watches), but acks_late keeps a message that never started from being lost.
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    enable_utc=True,
)


def configure(settings: CoreSettings, broker_url: str) -> Celery:
    """Point the app at its broker; the visibility timeout bounds how late a lost task returns."""
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
        },
        worker_concurrency=settings.worker_concurrency,
        worker_pool="threads",
    )
    return app


class ImagebatchStep(bootsteps.StartStopStep):
    """imagebatch's threads in every worker: the scheduler (leader-elected) and the heartbeat."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.threads: list[Any] = []

    def start(self, parent: Any) -> None:
        from worker import metrics, runtime, tasks
        from worker.runner import Heartbeat
        from worker.scheduler import SchedulerThread

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


app.steps["worker"].add(ImagebatchStep)


def _from_environment() -> None:
    """``celery -A worker.app …`` gets the broker from imagebatch's settings. Invalid settings
    are left to the command that reads them to report (one line, exit 2)."""
    try:
        settings = Settings()
    except ValidationError:
        return
    if settings.broker_url:
        configure(settings, settings.broker_url)


_from_environment()

"""The Celery app, configured from imagebatch's settings wherever it is loaded: by
``imagebatch worker``, by the embedded run, or by ``celery -A worker.app …`` (inspect,
control, events, flower), which all read ``IMAGEBATCH_BROKER_URL``.

Every worker, however it was started, consumes the ``imagebatch`` queue and runs imagebatch's
own threads (``worker.celery.bootstep``): the scheduler, which one worker leads at a time, and the
heartbeat that keeps this worker's running steps leased. Task events are on, so Flower and
``celery events`` see every task; a task whose lines failed is a failed task.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, setup_logging
from pydantic import ValidationError

from jobs.settings import CoreSettings, Settings
from worker.observability import logs
from worker.redis.keys import QUEUE

log = logging.getLogger(__name__)

app = Celery(
    "imagebatch",
    set_as_current=False,
    include=["worker.celery.tasks", "worker.services.inbox.schedule"],
)
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


def run_worker(settings: CoreSettings, extra: list[str]) -> int:
    """Run ``celery worker`` and return its exit status, as ``celery worker`` itself would:
    ``app.worker_main`` drops it, so a worker that stopped on an unrecoverable error would
    otherwise exit 0 and a supervisor with ``Restart=on-failure`` would leave it down."""
    # A JSON log is one object per line: no banner (celery -q) before the first record.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    argv = [
        *quiet,
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={QUEUE}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        "--task-events",
        *extra,
    ]
    started: list[Any] = []

    def keep(sender: Any = None, instance: Any = None, **_: Any) -> None:
        started.append(instance)

    celeryd_init.connect(keep, weak=False)
    try:
        app.worker_main(argv)
    finally:
        celeryd_init.disconnect(keep)
    code = getattr(started[-1], "exitcode", None) if started else None
    return code if isinstance(code, int) else 0


def _worker_logging(loglevel: str | int | None = None, **_: Any) -> None:
    """Celery's ``setup_logging`` signal: our handlers, not Celery's, in every worker."""
    logs.configure_worker(loglevel)


setup_logging.connect(_worker_logging)

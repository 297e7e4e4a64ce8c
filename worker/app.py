"""The Celery app and its configuration, tuned for I/O-bound, pay-per-call work.

``acks_late`` + ``reject_on_worker_lost``: a task whose worker dies is delivered again, and
every step is idempotent (``worker.pipeline``), so redelivery costs nothing. Results are
not stored: the line's state in Redis is the record.
"""

from __future__ import annotations

from celery import Celery

from jobs.settings import Settings

QUEUE = "imagebatch"
SUBMIT_QUEUE = "imagebatch.submit"

app = Celery("imagebatch", set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    enable_utc=True,
)


def configure(settings: Settings, broker_url: str) -> Celery:
    """Point the app at its broker; the visibility timeout bounds how late a lost task returns."""
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
        },
        worker_concurrency=settings.worker_concurrency,
    )
    return app

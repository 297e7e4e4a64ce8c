"""``celery -A worker.app …`` (inspect, control, events, flower, a plain ``worker``): the app,
configured from imagebatch's settings, with imagebatch's worker threads installed."""

from worker.celery import bootstep
from worker.celery.app import app

bootstep.install(app)

__all__ = ["app"]

"""``celery -A worker.app …`` (inspect, control, events, flower, a plain ``worker``): the app,
configured from imagebatch's settings, with imagebatch's worker threads registered."""

from worker.celery.app import app

__all__ = ["app"]

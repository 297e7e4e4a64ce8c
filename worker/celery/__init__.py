"""Celery: the only code that imports it. Importing this package registers imagebatch's
worker threads (``bootstep``) on the app, so every worker started from it runs them."""

from worker.celery import bootstep

__all__ = ["bootstep"]

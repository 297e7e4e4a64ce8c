"""Celery: the only code that imports it (the app, the tasks, the worker's own threads, the
embedded default, the beat)."""

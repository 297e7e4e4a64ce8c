"""imagebatch's runtime on Celery: app, tasks, Redis state, embedded default, command line."""

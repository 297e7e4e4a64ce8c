"""imagebatch's domain: manifests, requests, provider adapters, downloads, storage, results.

Nothing here imports Celery or the ``worker`` package; all of it runs without a broker.
"""

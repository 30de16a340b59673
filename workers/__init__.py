"""Celery workers: the app factory, the batch task, providers and result writing."""

"""Adapters that run the search engine across machines: Celery tasks, Redis job store."""

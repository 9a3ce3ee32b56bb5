"""Celery app, thin tasks, and the unit of work that applies one event."""

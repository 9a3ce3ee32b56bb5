"""A task that does nothing, for measuring Celery's own drain rate with refundsync's settings."""

from worker.app import app


@app.task(name="bench.noop", acks_late=True)
def noop(body: str, received_at: str, source: str = "webhook") -> None:
    """Receive the same arguments as events.apply; do nothing."""

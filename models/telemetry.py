"""Where Prometheus metrics live when one service runs as several processes."""

from __future__ import annotations

import os
import tempfile

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_metrics_between_processes() -> str:
    """Make prometheus_client keep its values in files every process of this service shares.

    Must run before prometheus_client is imported in this process and before any fork:
    the uvicorn workers of an ingest and the pool processes of a Celery worker each count
    for themselves, and the one that serves /metrics adds them up from this directory.
    A directory given in the environment is used as it is (empty it at each start).
    """
    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="refundsync-metrics-")
    return os.environ[MULTIPROC_ENV]

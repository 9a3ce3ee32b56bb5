"""Where Prometheus metrics live when one service runs as several processes."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_metrics_between_processes() -> str:
    """Make prometheus_client keep its values in files every process of this service shares.

    Must run before refundsync's metrics are created in this process and before any fork:
    the uvicorn workers of an ingest and the pool processes of a Celery worker each count
    for themselves, and the one that serves /metrics adds them up from this directory.
    A directory given in the environment is used as it is (empty it at each start).
    """
    if not os.environ.get(MULTIPROC_ENV):
        path = tempfile.mkdtemp(prefix="refundsync-metrics-")
        os.environ[MULTIPROC_ENV] = path
        # Made here, removed here: forked pool processes leave through os._exit and never
        # run this; only the process that made it does.
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
    # prometheus_client picks its value store when first imported; a plugin may have
    # imported it already (Celery's command line loads Flower's, which uses it), so pick
    # again now that the directory is known. Metrics created from here on share it.
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    return os.environ[MULTIPROC_ENV]

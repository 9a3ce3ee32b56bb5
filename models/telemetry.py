"""Where Prometheus metrics live when one service runs as several processes."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.registry import REGISTRY

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# prometheus_client's multiprocess helpers carry no annotations (its other modules do); typed
# here once, so a release that annotates them changes nothing for the callers.
_collect_from_files: Callable[[CollectorRegistry], object] = multiprocess.MultiProcessCollector
_mark_process_dead: Callable[[int], object] = multiprocess.mark_process_dead


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
        # setattr: the attribute is module state prometheus_client does not declare.
        setattr(values, "ValueClass", values.get_value_class())  # noqa: B010
    return os.environ[MULTIPROC_ENV]


def service_registry() -> CollectorRegistry:
    """The registry /metrics serves: every process's values added up when the service's
    processes share a directory, else this process's own."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    _collect_from_files(registry)
    return registry


def forget_process(pid: int) -> None:
    """Drop a finished process's live gauges from the shared directory."""
    if os.environ.get(MULTIPROC_ENV):
        _mark_process_dead(pid)

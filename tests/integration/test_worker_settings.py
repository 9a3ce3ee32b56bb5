"""Celery settings the delivery guarantees rest on, as the worker really loads them."""

from __future__ import annotations

from tests import support

_PRINT = """
import json
from worker.tasks import apply_event
from worker.app import app
print(json.dumps({
    "acks_late": apply_event.acks_late,
    "acks_on_timeout": apply_event.acks_on_timeout,
    "reject_on_worker_lost": apply_event.reject_on_worker_lost,
    "prefetch": app.conf.worker_prefetch_multiplier,
}))
"""


def test_apply_tasks_are_acknowledged_only_once_finished() -> None:
    env = support.service_env("postgresql://127.0.0.1:1/x", "redis://127.0.0.1:1/0")
    loaded = support.python_json(_PRINT, env)
    # A task killed by the hard time limit goes back on the queue: it may have died before
    # its event was recorded.
    assert loaded == {
        "acks_late": True,
        "acks_on_timeout": False,
        "reject_on_worker_lost": True,
        "prefetch": 16,
    }

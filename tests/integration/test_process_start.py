"""What the long-running processes do once started: start-up objects are frozen out of the
garbage collector, so full collections no longer pause them for ~100 ms to walk them."""

from __future__ import annotations

from tests import support

_WORKER = """
import gc, json
from celery.signals import worker_process_init, worker_ready
from worker.app import app
found = {"imported": gc.get_freeze_count()}
worker_process_init.send(sender=None)
found["pool process"] = gc.get_freeze_count()
gc.unfreeze()
worker_ready.send(sender=None)
found["main process"] = gc.get_freeze_count()
print(json.dumps(found))
"""

_INGEST = """
import gc, json
from starlette.testclient import TestClient
from ingest.app import app
found = {"imported": gc.get_freeze_count()}
with TestClient(app):
    found["serving"] = gc.get_freeze_count()
print(json.dumps(found))
"""


def test_worker_processes_freeze_start_up_objects() -> None:
    env = support.service_env("postgresql://127.0.0.1:1/x", "redis://127.0.0.1:1/0")
    found = support.python_json(_WORKER, env)
    assert found["imported"] == 0
    # Everything the app and its tasks imported, tens of thousands of objects.
    assert found["pool process"] > 10_000
    assert found["main process"] > 10_000


def test_ingest_freezes_start_up_objects(database: support.Database) -> None:
    redis = support.RedisServer().start()
    try:
        found = support.python_json(_INGEST, support.service_env(database.url, redis.url))
    finally:
        redis.cleanup()
    assert found["imported"] == 0
    assert found["serving"] > 10_000

"""A message the pool hands back untried is published again as it came, without the mark
that made the task hand it back (else the copy would be handed back again, for ever)."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.app.task import Context

from worker.policy import DEFERRED, Deferral, handed_back

app = Celery("test-defer", set_as_current=False)


def _apply(self: Any, *args: Any) -> None:
    del self, args


apply_event: Task[Any, Any] = app.task(name="events.apply", bind=True)(_apply)


def test_the_pool_mark_stays_out_of_the_message_published_again() -> None:
    request = Context(
        {
            "id": "t-1",
            "retries": 2,
            "args": ["{}", "2026-12-07T00:00:00+00:00", "webhook", "seal"],
            "kwargs": {},
            "delivery_info": {},
            "argsrepr": "('evt_1', 'refund.complete')",
            "kwargsrepr": "{}",
            "custom": "kept",
            DEFERRED: Deferral("not tried"),
        }
    )
    again = handed_back(apply_event, request)
    headers = again.options.get("headers") or {}
    # Celery copies the request's unknown fields into headers: ours must not travel.
    assert DEFERRED not in headers
    assert headers.get("custom") == "kept"
    assert (again.options["task_id"], again.options["retries"]) == ("t-1", 2)
    assert again.options["argsrepr"] == "('evt_1', 'refund.complete')"
    assert list(again.args) == request.args

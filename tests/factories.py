"""The one builder of DR events for tests that need a few of them by hand.

Histories of many events come from tests.eventgen, payloads exactly as DR publishes them from
tests/fixtures/dr_examples; the unit tests of the rules and the hostile-input corpus keep
builders of their own, made to vary one field at a time.
"""

from __future__ import annotations

import uuid
from typing import Any

# When events built here happened, unless a test says otherwise.
CREATED = "2024-05-14T10:00:00Z"
# The event type DR sends for a refund in each state.
REFUND_TYPE = {
    "pending": "refund.pending",
    "succeeded": "refund.complete",
    "failed": "refund.failed",
}


def envelope(
    event_type: str,
    data_object: dict[str, Any],
    *,
    created: str = CREATED,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A DR event (test mode) carrying `data_object`, with a fresh id unless given."""
    return {
        "id": event_id or str(uuid.uuid4()),
        "type": event_type,
        "createdTime": created,
        "liveMode": False,
        "data": {"object": data_object},
    }


def refund_event(
    order_id: str,
    *,
    state: str = "pending",
    amount: Any = 10.0,
    refund_id: str | None = None,
    event_type: str | None = None,
    created: str = CREATED,
    **fields: Any,
) -> dict[str, Any]:
    """An event about one refund of `order_id` in USD; the type follows the state unless
    given, and `fields` are added to the refund as they are."""
    refund = {
        "id": refund_id or f"re_{uuid.uuid4()}",
        "orderId": order_id,
        "currency": "USD",
        "amount": amount,
        "state": state,
        **fields,
    }
    return envelope(event_type or REFUND_TYPE[state], refund, created=created)

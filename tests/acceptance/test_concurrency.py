"""Two events for one refund applied concurrently by different workers, in interleavings
forced by locks the test holds: no update is lost and no effect is doubled."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import Connection, text

from tests import deadlines, support
from tests.support import Stack


def _event(order_id: str, refund_id: str, state: str, created: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": "refund.complete" if state == "succeeded" else "refund.pending",
        "createdTime": created,
        "liveMode": False,
        "data": {
            "object": {
                "id": refund_id,
                "orderId": order_id,
                "currency": "USD",
                "amount": 20.0,
                "refundedAmount": 20.0 if state == "succeeded" else 0.0,
                "state": state,
            }
        },
    }


def _waiters(stack: Stack, conn: Connection) -> int:
    """Worker transactions blocked on a row lock in this test's database."""
    # pg_stat_activity is a snapshot per transaction: end it so each poll sees anew.
    conn.rollback()
    return int(
        conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    )


def _history(stack: Stack, event_id: str) -> int:
    with stack.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM refund_history WHERE event_id = :id"), {"id": event_id}
            ).scalar_one()
        )


@pytest.mark.parametrize("first", ["pending", "succeeded"])
def test_both_events_wait_on_the_order_lock_then_race(stack: Stack, first: str) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    refund_id = f"re_{uuid.uuid4()}"
    pending = _event(order_id, refund_id, "pending", "2024-05-14T10:00:00Z")
    complete = _event(order_id, refund_id, "succeeded", "2024-05-14T18:00:00Z")
    ordered = [pending, complete] if first == "pending" else [complete, pending]
    with stack.engine.connect() as holder, stack.engine.connect() as watcher:
        holder.execute(text("INSERT INTO orders (id) VALUES (:id)"), {"id": order_id})
        holder.execute(text("SELECT 1 FROM orders WHERE id = :id FOR UPDATE"), {"id": order_id})
        for event in ordered:
            assert support.post_event(stack.base, event).status_code == 202
        # Both workers are inside their apply transaction, blocked on the order row.
        support.wait_for(
            lambda: _waiters(stack, watcher) >= 2,
            timeout=4,
            interval=0.02,
            what="both workers waiting on the order lock",
        )
        holder.commit()
    found = support.wait_finished(stack.engine, [pending["id"], complete["id"]])
    assert found[complete["id"]] == "applied"
    assert found[pending["id"]] in {"applied", "stale"}
    summary = stack.api(f"/orders/{order_id}").json()
    assert [(r["state"], r["lastEventId"]) for r in summary["refunds"]] == [
        ("succeeded", complete["id"])
    ]
    assert summary["refundedAmount"] == "20.00"
    assert _history(stack, complete["id"]) == 1
    assert _history(stack, pending["id"]) == (1 if found[pending["id"]] == "applied" else 0)


def test_two_copies_wait_on_the_event_row_then_one_applies(stack: Stack) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _event(order_id, f"re_{uuid.uuid4()}", "pending", "2024-05-14T10:00:00Z")
    with stack.engine.connect() as holder, stack.engine.connect() as watcher:
        holder.execute(
            text(
                "INSERT INTO webhook_events (id, type, payload, deliveries, attempts, received_at)"
                " VALUES (:id, :type, CAST(:payload AS jsonb), 1, 0, now())"
            ),
            {"id": event["id"], "type": event["type"], "payload": json.dumps(event)},
        )
        holder.commit()
        holder.execute(
            text("SELECT 1 FROM webhook_events WHERE id = :id FOR UPDATE"), {"id": event["id"]}
        )
        body = json.dumps(event).encode()
        for _ in range(2):
            assert support.post_event(stack.base, body).status_code == 202
        support.wait_for(
            lambda: _waiters(stack, watcher) >= 2,
            timeout=4,
            interval=0.02,
            what="both copies waiting on the event row",
        )
        holder.commit()
    assert support.wait_finished(stack.engine, [event["id"]]) == {event["id"]: "applied"}

    def counted() -> bool:
        return bool(stack.api(f"/events/{event['id']}").json()["deliveries"] == 3)

    support.wait_for(counted, timeout=deadlines.APPLY_S, what="3 deliveries")
    assert _history(stack, event["id"]) == 1
    assert stack.api(f"/orders/{order_id}").json()["pendingRefundAmount"] == "20.00"


@pytest.mark.parametrize("first", ["pending", "succeeded"])
def test_one_after_the_other_in_either_order(stack: Stack, first: str) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    refund_id = f"re_{uuid.uuid4()}"
    pending = _event(order_id, refund_id, "pending", "2024-05-14T10:00:00Z")
    complete = _event(order_id, refund_id, "succeeded", "2024-05-14T18:00:00Z")
    for event in [pending, complete] if first == "pending" else [complete, pending]:
        assert support.post_event(stack.base, event).status_code == 202
        support.wait_finished(stack.engine, [event["id"]])
    summary = stack.api(f"/orders/{order_id}").json()
    assert [r["state"] for r in summary["refunds"]] == ["succeeded"]
    expected = "applied" if first == "pending" else "stale"
    assert support.outcomes(stack.engine, [pending["id"]]) == {pending["id"]: expected}

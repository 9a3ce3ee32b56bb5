"""Contract v2 end to end: DR's published examples through the ingest and real workers, the
reads v2 adds, the pending-refund check against a fake of DR's Refunds API, and the rebuild
that carries stored orders forward."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from models.settings import Settings
from tests import eventgen, support
from tests.fake_dr import FakeDR
from tests.support import Stack
from worker.reconcile import pending
from worker.reconcile.dr_api import DRClient


def _published(name: str, **obj: Any) -> dict[str, Any]:
    """A published example with an event id of its own and its object's fields replaced."""
    event: dict[str, Any] = json.loads(support.load_fixture(f"dr_published/{name}"))
    data = {"object": {**event["data"]["object"], **obj}}
    return {**event, "id": f"evt-{uuid.uuid4().hex}", "data": data}


def _send(stack: Stack, *events: dict[str, Any]) -> dict[str, str]:
    for event in events:
        response = support.post_event(stack.base, event)
        assert response.status_code == 202, response.text
    return support.wait_finished(stack.engine, [event["id"] for event in events])


def _key() -> str:
    return uuid.uuid4().hex[:10]


def _only_due(stack: Stack, refund_id: str) -> None:
    """Make `refund_id` the one refund the pending check asks DR about: the session's
    database holds other tests' pending refunds, and a run asks about 200 at most."""
    with stack.engine.begin() as conn:
        conn.execute(
            text("UPDATE refunds SET checked_at = now() WHERE id <> :id"), {"id": refund_id}
        )


def test_published_examples_reach_every_read_of_contract_v2(stack: Stack) -> None:
    order_id, upstream_id, invoice_id = f"ord-{_key()}", f"up-{_key()}", f"inv-{_key()}"
    pending = _published("refund.pending_information.json", orderId=order_id, currency="USD")
    charges = _published("order.charge.refund.failed.json", id=order_id, upstreamId=upstream_id)
    invoice = _published("refund.complete.json", invoiceId=invoice_id)
    del invoice["data"]["object"]["orderId"]
    refused = _published("order.refunded.json", id=order_id, upstreamId="u" * 10_000)
    assert _send(stack, pending, charges, invoice, refused) == {
        pending["id"]: "applied",
        charges["id"]: "applied",
        invoice["id"]: "applied",
        refused["id"]: "failed",
    }

    # The merchant's own order id finds the order.
    (found,) = stack.api(f"/orders?upstreamId={upstream_id}").json()
    assert (found["orderId"], found["upstreamId"]) == (order_id, upstream_id)
    assert (found["capturedAmount"], found["pendingRefundAmount"]) == ("27.10", "33.00")
    assert stack.api("/orders?upstreamId=").status_code == 400
    assert stack.api(f"/orders?upstreamId={'x' * 300}").json() == []

    summary = stack.api(f"/orders/{order_id}").json()
    assert eventgen.comparable(summary) == eventgen.comparable(found)
    assert summary["version"] == 2
    assert (
        summary["refunds"][0]["tokenInformation"]["token"]
        == (pending["data"]["object"]["tokenInformation"]["token"])
    )

    # An invoice's refunds are kept under the invoice, not as an order.
    by_invoice = stack.api(f"/invoices/{invoice_id}")
    assert by_invoice.status_code == 200, by_invoice.text
    assert (by_invoice.json()["invoiceId"], by_invoice.json()["orderId"]) == (invoice_id, None)
    assert by_invoice.json()["refundedAmount"] == "13.51"
    assert stack.api(f"/orders/{invoice_id}").status_code == 404
    assert stack.api(f"/invoices/{order_id}").status_code == 404

    # Every event record names its order (or invoice), the failed ones too.
    record = stack.api(f"/events/{refused['id']}").json()
    assert (record["orderId"], record["outcome"]) == (order_id, "failed")
    assert "upstreamId" in record["error"]
    assert stack.api(f"/events/{invoice['id']}").json()["orderId"] == invoice_id
    listed = stack.api(f"/events?orderId={order_id}").json()
    assert {r["id"] for r in listed} == {pending["id"], charges["id"], refused["id"]}
    received = [r["receivedAt"] for r in listed]
    assert received == sorted(received, reverse=True)
    assert stack.api(f"/events?orderId={order_id}&limit=1").json() == listed[:1]
    assert stack.api(f"/events?orderId={'x' * 300}").json() == []


def test_dispute_examples_show_the_dispute_in_any_order(stack: Stack) -> None:
    order_id = f"ord-{_key()}"
    resolved = _published("order.dispute.resolved.json", id=order_id)
    opened = _published("order.dispute.json", id=order_id)
    # The resolution arrives first; the older dispute event changes nothing.
    assert _send(stack, resolved) == {resolved["id"]: "applied"}
    assert _send(stack, opened) == {opened["id"]: "stale"}
    summary = stack.api(f"/orders/{order_id}").json()
    assert (summary["disputeStatus"], summary["orderState"]) == ("resolved", "accepted")
    assert summary["version"] == 1


def test_a_refund_dr_never_reports_as_expired_is_learned_from_dr(
    stack: Stack, fake: FakeDR
) -> None:
    order_id, refund_id = f"ord-{_key()}", f"re_{uuid.uuid4()}"
    event = _published("refund.pending_information.json", orderId=order_id, id=refund_id)
    assert _send(stack, event) == {event["id"]: "applied"}
    assert stack.api(f"/orders/{order_id}").json()["pendingRefundAmount"] == "33"
    fake.refunds[refund_id] = {**event["data"]["object"], "state": "expired"}
    _only_due(stack, refund_id)
    env = {**stack.env, "DR_API_KEY": fake.api_key, "DR_API_BASE_URL": fake.url}

    first = support.run_cli(env, "reconcile", "--check-pending")
    assert first.returncode == 0, first.stderr[-3000:]
    # A refund pending over a day (the published one is from 2022): one call, one change.
    assert first.stdout.strip().splitlines()[-1] == (
        "check-pending: checked=1 changed=1 unknown=0 api_calls=1"
    )
    check_id = f"pending-check-{refund_id}-expired"
    assert support.wait_finished(stack.engine, [check_id]) == {check_id: "applied"}
    summary = stack.api(f"/orders/{order_id}").json()
    assert (summary["refunds"][0]["state"], summary["pendingRefundAmount"]) == ("expired", "0")
    assert summary["refundStatus"] == "failed"
    record = stack.api(f"/events/{check_id}").json()
    assert (record["type"], record["orderId"]) == ("refund.updated", order_id)

    # Asked about once per REFUNDSYNC_PENDING_CHECK_SECONDS: not again right away.
    asked = [seen.path for seen in fake.requests].count(f"/refunds/{refund_id}")
    again = support.run_cli(env, "reconcile", "--check-pending")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [seen.path for seen in fake.requests].count(f"/refunds/{refund_id}") == asked == 1


def test_rebuild_carries_stored_orders_forward(stack: Stack) -> None:
    order_id, upstream_id = f"ord-{_key()}", f"up-{_key()}"
    events = [
        _published("refund.pending-3.json", orderId=order_id),
        _published("order.refunded.json", id=order_id, upstreamId=upstream_id, currency="USD"),
    ]
    assert set(_send(stack, *events).values()) == {"applied"}
    expected = stack.api(f"/orders/{order_id}").json()
    # What an order stored before contract v2 lacks.
    with stack.engine.begin() as conn:
        conn.execute(
            text("UPDATE refunds SET items = NULL, type = NULL WHERE order_id = :id"),
            {"id": order_id},
        )
        conn.execute(
            text(
                "UPDATE orders SET upstream_id = NULL, upstream_id_event_id = NULL,"
                " upstream_id_event_time = NULL, dr_captured_amount = NULL,"
                " dr_captured_event_id = NULL, dr_captured_event_time = NULL, version = 0"
                " WHERE id = :id"
            ),
            {"id": order_id},
        )
        # Nor had it a change feed.
        conn.execute(text("DELETE FROM changes WHERE order_key = :id"), {"id": order_id})
    assert stack.api(f"/orders/{order_id}").json()["upstreamId"] is None

    result = support.run_cli(stack.env, "order", "rebuild", "--batch", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("rebuild: orders=")
    rebuilt = stack.api(f"/orders/{order_id}").json()
    assert eventgen.comparable(rebuilt) == eventgen.comparable(expected)
    # An order stored before versions existed: the rebuild is its first versioned change,
    # and the feed has it (made by no event).
    assert rebuilt["version"] == 1
    with stack.engine.connect() as conn:
        fed = conn.execute(
            text("SELECT version, event_id, summary::text FROM changes WHERE order_key = :id"),
            {"id": order_id},
        ).all()
    assert [(row.version, row.event_id) for row in fed] == [(1, None)]
    assert eventgen.comparable(json.loads(fed[0].summary)) == eventgen.comparable(rebuilt)
    assert stack.api(f"/orders?upstreamId={upstream_id}").json()[0]["orderId"] == order_id

    # Rebuilt already: a second run changes nothing, and no version moves.
    again = support.run_cli(stack.env, "order", "rebuild")
    assert again.returncode == 0, again.stderr[-3000:]
    assert " changed=0 " in again.stdout
    assert stack.api(f"/orders/{order_id}").json() == rebuilt


def test_events_ignored_before_an_upgrade_are_replayed_under_the_new_rules(stack: Stack) -> None:
    # What contract v1 left of a dispute: the event recorded as ignored, no order.
    order_id = f"ord-{_key()}"
    dispute = _published("order.dispute.json", id=order_id)
    with stack.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhook_events (id, type, payload, outcome, error, received_at,"
                " processed_at) VALUES (:id, 'order.dispute', CAST(:payload AS jsonb),"
                " 'ignored', 'event type order.dispute is not handled', now(), now())"
            ),
            {"id": dispute["id"], "payload": json.dumps(dispute)},
        )
    result = support.run_cli(stack.env, "events", "replay", "--ignored", "order.dispute")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"queued {dispute['id']} order.dispute" in result.stdout
    assert support.wait_finished(stack.engine, [dispute["id"]]) == {dispute["id"]: "applied"}
    summary = stack.api(f"/orders/{order_id}").json()
    assert (summary["disputeStatus"], summary["orderState"]) == ("open", "dispute")
    usage = support.run_cli(stack.env, "events", "replay", "--failed", "--ignored", "x")
    assert usage.returncode == 2


def test_a_change_that_could_not_be_published_is_asked_about_again(
    stack: Stack, fake: FakeDR
) -> None:
    order_id, refund_id = f"ord-{_key()}", f"re_{uuid.uuid4()}"
    event = _published("refund.pending_information.json", orderId=order_id, id=refund_id)
    assert _send(stack, event) == {event["id"]: "applied"}
    fake.refunds[refund_id] = {**event["data"]["object"], "state": "expired"}
    _only_due(stack, refund_id)
    settings = Settings(
        DATABASE_URL=stack.db_url, DR_API_KEY=fake.api_key, DR_API_BASE_URL=fake.url
    )

    def broker_down(*_: object) -> None:
        raise ConnectionError("the broker is unreachable")

    with DRClient(fake.url, fake.api_key) as client, pytest.raises(ConnectionError):
        pending.check_pending(settings, stack.engine, client, broker_down)
    with stack.engine.connect() as conn:
        checked = conn.execute(
            text("SELECT checked_at FROM refunds WHERE order_id = :o AND id = :r"),
            {"o": order_id, "r": refund_id},
        ).scalar_one()
        recorded = conn.execute(
            text("SELECT outcome, source, order_id FROM webhook_events WHERE id = :id"),
            {"id": f"pending-check-{refund_id}-expired"},
        ).one()
    assert checked is None
    # Recorded before the publish failed: the sweeper finds it unfinished and publishes it.
    assert tuple(recorded) == ("queued", "pending-check", order_id)

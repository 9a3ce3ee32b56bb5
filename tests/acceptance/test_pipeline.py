"""End to end on real processes: HTTP -> Redis -> Celery workers -> Postgres -> read API."""

from __future__ import annotations

import json
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from tests import deadlines, eventgen, factories, support
from tests.support import Stack

# DR's published examples, in the order of the order's life (the files are numbered).
EXAMPLES = sorted(path.name for path in (support.FIXTURES / "dr_examples").glob("*.json"))


def _refund_event(
    order_id: str, refund_id: str, state: str, created: str, **extra: Any
) -> dict[str, Any]:
    fields = {
        "refundedAmount": 10.0 if state == "succeeded" else 0.0,
        "createdTime": factories.CREATED,
        **extra,
    }
    return factories.refund_event(
        order_id, state=state, refund_id=refund_id, created=created, **fields
    )


def _history_rows(stack: Stack, event_id: str) -> int:
    with stack.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM refund_history WHERE event_id = :id"), {"id": event_id}
            ).scalar_one()
        )


def _record(stack: Stack, event_id: str) -> dict[str, Any]:
    response = stack.api(f"/events/{event_id}")
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def test_every_doc_example_flows_from_http_to_the_order_summary(stack: Stack) -> None:
    bodies = [support.load_fixture(f"dr_examples/{name}") for name in EXAMPLES]
    ids = [json.loads(body)["id"] for body in bodies]
    for body in bodies:
        response = support.post_event(stack.base, body)
        assert response.status_code == 202, response.text
        assert response.json() == {"id": json.loads(body)["id"], "status": "queued"}
    found = support.wait_finished(stack.engine, ids)
    assert set(found.values()) <= {"applied", "stale"}, found

    summary = stack.api("/orders/241500010336").json()
    expected = eventgen.expected_summaries([json.loads(body) for body in bodies])["241500010336"]
    assert eventgen.comparable(summary) == expected
    assert summary["refundStatus"] == "charged_back"
    assert summary["refundedAmount"] == "27.01"
    assert summary["pendingRefundAmount"] == "0.00"
    assert summary["drRefundedAmount"] == "27.01"
    assert summary["chargebackStatus"] == "charged_back"
    assert summary["chargebackAmount"] == "27.01"
    states = {r["id"]: (r["state"], r["amount"]) for r in summary["refunds"]}
    assert states == {
        "re_7f1c2b3a-9d84-4e1f-b2a6-3c5d7e9f0a12": ("succeeded", "27.01"),
        "re_3d9a8c7b-2e1f-4a0b-9c8d-7e6f5a4b3c14": ("failed", "5.00"),
    }
    assert [(e["state"], e["amount"]) for e in summary["chargeRefunds"]] == [("complete", "27.01")]
    assert summary["chargebacks"] == [
        {"id": "0241500010_000020_3700009921", "type": "fraud_chargeback", "amount": "27.01"}
    ]
    assert summary["updatedAt"] is not None


def test_same_event_delivered_five_times_concurrently_is_applied_once(stack: Stack) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _refund_event(order_id, f"re_{uuid.uuid4()}", "pending", "2024-05-14T10:00:01Z")
    body = json.dumps(event).encode()
    with ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(lambda _: support.post_event(stack.base, body).status_code, range(5)))
    assert codes == [202] * 5

    def all_copies_counted() -> dict[str, Any] | None:
        record = _record(stack, event["id"])
        return record if record["deliveries"] == 5 and record["outcome"] != "queued" else None

    record = support.wait_for(all_copies_counted, timeout=deadlines.APPLY_S, what="5 deliveries")
    assert record["outcome"] == "applied"
    assert _history_rows(stack, event["id"]) == 1
    assert stack.api(f"/orders/{order_id}").json()["pendingRefundAmount"] == "10.00"


def test_complete_arriving_before_pending_ends_succeeded_and_pending_is_stale(stack: Stack) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    refund_id = f"re_{uuid.uuid4()}"
    pending = _refund_event(order_id, refund_id, "pending", "2024-05-14T10:00:01Z")
    complete = _refund_event(order_id, refund_id, "succeeded", "2024-05-14T18:00:00Z")
    assert support.post_event(stack.base, complete).status_code == 202
    support.wait_finished(stack.engine, [complete["id"]])
    assert support.post_event(stack.base, pending).status_code == 202
    found = support.wait_finished(stack.engine, [pending["id"]])

    assert found[pending["id"]] == "stale"
    assert _record(stack, complete["id"])["outcome"] == "applied"
    summary = stack.api(f"/orders/{order_id}").json()
    assert [r["state"] for r in summary["refunds"]] == ["succeeded"]
    assert summary["refundStatus"] == "partially_refunded"
    assert summary["refundedAmount"] == "10.00"
    assert _history_rows(stack, pending["id"]) == 0


def test_500_events_for_50_orders_each_sent_3_times_in_random_order_converge(stack: Stack) -> None:
    rng = random.Random(20240514)
    events = [
        event
        for n in range(50)
        for event in eventgen.order_history(rng, f"ord-{uuid.uuid4().hex[:8]}-{n}", 10)
    ]
    assert len(events) == 500
    deliveries = [json.dumps(event).encode() for event in events for _ in range(3)]
    rng.shuffle(deliveries)
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(lambda body: support.post_event(stack.base, body).status_code, deliveries)
        )
    assert codes == [202] * len(deliveries)

    ids = [event["id"] for event in events]
    found = support.wait_finished(stack.engine, ids, timeout=deadlines.BACKLOG_S)
    assert "failed" not in found.values()

    def copies_counted() -> bool:
        with stack.engine.connect() as conn:
            return (
                conn.execute(
                    text(
                        "SELECT bool_and(deliveries = 3) FROM webhook_events WHERE id = ANY(:ids)"
                    ),
                    {"ids": ids},
                ).scalar_one()
                is True
            )

    support.wait_for(copies_counted, timeout=deadlines.APPLY_S, what="3 deliveries each")
    expected = eventgen.expected_summaries(events)
    for order_id, summary in expected.items():
        actual = stack.api(f"/orders/{order_id}").json()
        assert eventgen.comparable(actual) == summary, order_id


def test_invalid_payload_of_known_type_fails_with_reason_and_order_keeps_applying(
    stack: Stack,
) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    first = _refund_event(order_id, f"re_{uuid.uuid4()}", "pending", "2024-05-14T10:00:01Z")
    broken = _refund_event(order_id, "ignored", "succeeded", "2024-05-14T11:00:00Z")
    del broken["data"]["object"]["id"]
    later = _refund_event(order_id, f"re_{uuid.uuid4()}", "succeeded", "2024-05-14T12:00:00Z")
    for event in (first, broken, later):
        assert support.post_event(stack.base, event).status_code == 202
    found = support.wait_finished(stack.engine, [first["id"], broken["id"], later["id"]])

    assert found == {first["id"]: "applied", broken["id"]: "failed", later["id"]: "applied"}
    record = _record(stack, broken["id"])
    assert "id" in record["error"]
    assert "required" in record["error"].lower()
    assert _history_rows(stack, broken["id"]) == 0
    failed = stack.api("/events?outcome=failed&limit=50").json()
    assert broken["id"] in [r["id"] for r in failed]
    summary = stack.api(f"/orders/{order_id}").json()
    assert sorted(r["state"] for r in summary["refunds"]) == ["pending", "succeeded"]


@pytest.mark.parametrize("kind", ["order.accepted", "invoice.created"])
def test_unhandled_event_types_are_queued_and_recorded_as_ignored(stack: Stack, kind: str) -> None:
    event: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": kind,
        "createdTime": "2024-05-14T10:00:00Z",
        "liveMode": False,
        "data": {"object": {"id": "x"}},
    }
    assert support.post_event(stack.base, event).status_code == 202
    assert support.wait_finished(stack.engine, [event["id"]]) == {event["id"]: "ignored"}

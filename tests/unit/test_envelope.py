"""The one envelope check, as the ingest, the worker and reconciliation all apply it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from models.envelope import EventHeader, UnusableEnvelope, header_of

GOOD = {"id": "evt_1", "type": "refund.complete", "createdTime": "2026-06-30T11:00:00Z"}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([GOOD], None),
        ("evt_1", None),
        ({**GOOD, "id": None}, "id"),
        ({**GOOD, "id": 7}, "id"),
        ({**GOOD, "id": ""}, "id"),
        ({**GOOD, "id": " \t"}, "id"),
        ({**GOOD, "id": "e" * 256}, "id"),
        ({**GOOD, "id": "evt\n1"}, "id"),
        ({**GOOD, "id": "evt\x7f"}, "id"),
        ({**GOOD, "id": "evt\ud800"}, "id"),
        ({**GOOD, "type": None}, "type"),
        ({**GOOD, "type": "refund.\x00complete"}, "type"),
    ],
)
def test_an_unusable_envelope_names_what_is_missing(data: Any, field: str | None) -> None:
    with pytest.raises(UnusableEnvelope) as raised:
        header_of(data)
    assert raised.value.field == field
    assert (field or "not a JSON object") in str(raised.value)


def test_a_usable_envelope_gives_its_header() -> None:
    header = header_of({**GOOD, "id": "e" * 255, "liveMode": True})
    assert header == EventHeader(
        id="e" * 255,
        type="refund.complete",
        created_time=datetime(2026, 6, 30, 11, tzinfo=UTC),
        live_mode=True,
    )


@pytest.mark.parametrize(
    ("extra", "attribute"),
    [
        ({"createdTime": "2026-06-30T11:00:00"}, "created_time"),  # no zone
        ({"createdTime": "yesterday"}, "created_time"),
        ({"createdTime": None}, "created_time"),
        ({"liveMode": "true"}, "live_mode"),
    ],
)
def test_an_unusable_time_or_mode_reads_as_absent(extra: dict[str, Any], attribute: str) -> None:
    assert getattr(header_of({**GOOD, **extra}), attribute) is None


@pytest.mark.parametrize(
    ("event_type", "obj", "order_id"),
    [
        ("refund.complete", {"id": "re_1", "orderId": "ord_1"}, "ord_1"),
        ("refund.complete", {"id": "re_1", "invoiceId": "inv_1"}, "inv_1"),
        ("refund.complete", {"id": "re_1"}, None),
        ("order.refunded", {"id": "ord_1"}, "ord_1"),
        ("order.charge.refund.complete", {"id": "ch_1", "orderId": "ord_1"}, "ord_1"),
        # A Charge without its orderId names no order: its id is the charge's.
        ("order.charge.refund.complete", {"id": "ch_1"}, None),
        ("order.charge.refund.failed", {"id": "ord_1", "payment": {"charges": []}}, "ord_1"),
        ("sales_transaction.created", {"id": "st_1", "orderId": "ord_1"}, "ord_1"),
        ("fulfillment.created", {"id": "ful_1"}, None),
        ("order.refunded", {"id": "ord\n1"}, None),
    ],
)
def test_the_header_names_the_order_the_event_is_about(
    event_type: str, obj: dict[str, Any], order_id: str | None
) -> None:
    header = header_of({**GOOD, "type": event_type, "data": {"object": obj}})
    assert header.order_id == order_id

"""Contract v2 of the refund summary, on DR's own published examples and on sequences built
from them (tests/fixtures/dr_published, SOURCES.md there names each one's page).

Each numbered section is one point of the issue that brought v2: v1's rules gave the wrong
answer there, and the test names what v2 gives.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from models.errors import InvalidEvent
from models.outcome import Outcome
from models.payloads import Envelope, as_utc, load_json
from models.rules import EventRef, Ignore, OrderState, Plan, apply, interpret
from models.summary import summarize
from tests.eventgen import comparable

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "dr_published"
EVENT_FILES = sorted(path.name for path in PUBLISHED.glob("*.json") if ".object" not in path.name)


def published(name: str, **changes: Any) -> dict[str, Any]:
    """A published example, its envelope fields replaced by `changes` and its object's
    fields by `object=`."""
    event: dict[str, Any] = json.loads((PUBLISHED / name).read_text())
    obj = {**event["data"]["object"], **changes.pop("object", {})}
    return {**event, **changes, "data": {**event["data"], "object": obj}}


def envelope(event: dict[str, Any]) -> Envelope:
    return Envelope.model_validate(load_json(json.dumps(event)))


def run(events: list[dict[str, Any]]) -> OrderState:
    state: OrderState | None = None
    for event in events:
        env = envelope(event)
        plan = interpret(env, "any")
        assert isinstance(plan, Plan), plan
        state = state or OrderState(plan.order_id, kind=plan.kind)
        state = apply(state, EventRef(as_utc(env.createdTime), env.id), plan).state
    assert state is not None
    return state


def summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    return comparable(summarize(run(events)))


def at(minute: int) -> str:
    return f"2022-03-20T10:{minute:02d}:00Z"


# --- DR's published examples, every handled type that has one --------------------------------


@pytest.mark.parametrize("name", EVENT_FILES)
def test_every_published_example_applies(name: str) -> None:
    env = envelope(json.loads((PUBLISHED / name).read_text()))
    plan = interpret(env, "any")
    assert isinstance(plan, Plan), plan
    decision = apply(
        OrderState(plan.order_id, kind=plan.kind), EventRef(env.createdTime, env.id), plan
    )
    assert decision.outcome is Outcome.APPLIED
    assert decision.state.version == 1


def test_the_published_examples_cover_every_handled_type_dr_published() -> None:
    types = {json.loads((PUBLISHED / name).read_text())["type"] for name in EVENT_FILES}
    # DR published no example of refund.updated, order.charge.refund.pending,
    # order.chargeback or sales_transaction.created (SOURCES.md).
    assert types == {
        "refund.pending",
        "refund.pending_information",
        "refund.complete",
        "refund.failed",
        "order.charge.refund.complete",
        "order.charge.refund.failed",
        "order.refunded",
        "order.dispute",
        "order.dispute.resolved",
    }


# --- 1. availableToRefundAmount 0 is not "refunded" while a refund is pending ------------------

A = "re_252eb3f4-ad94-4e63-ab8d-3e4cd8ec4a17"
ORDER = "219975310336"


def _refund(state: str, refund_id: str, minute: int, **obj: Any) -> dict[str, Any]:
    name = {"succeeded": "refund.complete.json", "failed": "refund.failed.json"}.get(
        state, "refund.pending.json"
    )
    refunded = 27.01 if state == "succeeded" else 0.0
    return published(
        name,
        id=f"evt-{refund_id}-{state}",
        createdTime=at(minute),
        object={
            "id": refund_id,
            "orderId": ORDER,
            "amount": 27.01,
            "refundedAmount": refunded,
            "state": state,
            "createdTime": "2022-03-17T21:03:59Z",
            "charges": [],
        },
    )


def _order_refunded(minute: int, refunded: float, available: float) -> dict[str, Any]:
    return published(
        "order.refunded.json",
        id=f"evt-order-{minute}",
        createdTime=at(minute),
        object={
            "id": ORDER,
            "totalAmount": 54.02,
            "capturedAmount": 54.02,
            "refundedAmount": refunded,
            "availableToRefundAmount": available,
            "payment": {"charges": []},
        },
    )


def test_a_pending_refund_keeps_an_order_with_nothing_available_partially_refunded() -> None:
    # A of 27.01 succeeds, B of 27.01 is pending: DR's figure, which subtracts pending
    # refunds, shows 0 available. v1 said "refunded".
    events = [
        _refund("succeeded", A, 1),
        _refund("pending", "re_B", 2),
        _order_refunded(3, refunded=27.01, available=0.0),
    ]
    out = summary(events)
    assert out["refundStatus"] == "partially_refunded"
    assert (out["refundedAmount"], out["pendingRefundAmount"]) == ("27.01", "27.01")
    assert out["availableToRefundAmount"] == "0.00"


def test_a_refund_that_fails_after_dr_computed_zero_makes_money_available_again() -> None:
    # ...then B fails: v1 stayed "refunded" with 27.01 of 54.02 refunded.
    events = [
        _refund("succeeded", A, 1),
        _refund("pending", "re_B", 2),
        _order_refunded(3, refunded=27.01, available=0.0),
        _refund("failed", "re_B", 4),
    ]
    assert summary(events) == {
        "orderId": ORDER,
        "upstreamId": None,
        "currency": "USD",
        "orderState": "complete",
        "totalAmount": "54.02",
        "capturedAmount": "54.02",
        "availableToRefundAmount": "0.00",
        "refundStatus": "partially_refunded",
        "refundedAmount": "27.01",
        "pendingRefundAmount": "0.00",
        "drRefundedAmount": "27.01",
        "chargebackStatus": "none",
        "chargebackAmount": "0.00",
        "disputeStatus": "none",
        "refunds": [
            {
                "id": A,
                "type": None,
                "state": "succeeded",
                "amount": "27.01",
                "refundedAmount": "27.01",
                "reason": None,
                "failureReason": None,
                "items": [],
                "metadata": {},
                "expiresTime": None,
                "tokenInformation": None,
                "createdTime": "2022-03-17T21:03:59Z",
                "lastEventId": f"evt-{A}-succeeded",
                "lastEventTime": at(1),
            },
            {
                "id": "re_B",
                "type": None,
                "state": "failed",
                "amount": "27.01",
                "refundedAmount": "0.00",
                "reason": None,
                "failureReason": None,
                "items": [],
                "metadata": {},
                "expiresTime": None,
                "tokenInformation": None,
                "createdTime": "2022-03-17T21:03:59Z",
                "lastEventId": "evt-re_B-failed",
                "lastEventTime": at(4),
            },
        ],
        "chargeRefunds": [],
        "chargebacks": [],
        "lastEventId": "evt-re_B-failed",
        "lastEventTime": at(4),
    }


def test_nothing_available_and_nothing_pending_is_refunded() -> None:
    events = [
        _refund("succeeded", A, 1),
        _order_refunded(3, refunded=27.01, available=0.0),
    ]
    assert summary(events)["refundStatus"] == "refunded"


def test_refunds_covering_the_captured_amount_are_refunded_whatever_dr_shows() -> None:
    events = [
        _refund("succeeded", A, 1),
        _refund("succeeded", "re_B", 2),
        _order_refunded(3, refunded=27.01, available=27.01),
    ]
    out = summary(events)
    assert (out["refundStatus"], out["refundedAmount"]) == ("refunded", "54.02")


# --- 2. charge-level refunds count ------------------------------------------------------------


def test_dr_published_charge_refund_complete_is_refunded_money() -> None:
    # DR's example: a Charge whose refunds[] holds one complete entry of 5.38. v1 said
    # refundStatus "none" and refundedAmount "0.00".
    out = summary([published("order.charge.refund.complete.json")])
    assert out == {
        "orderId": "204289570336",
        "upstreamId": None,
        "currency": "USD",
        "orderState": None,
        "totalAmount": None,
        "capturedAmount": None,
        "availableToRefundAmount": None,
        "refundStatus": "partially_refunded",
        "refundedAmount": "5.38",
        "pendingRefundAmount": "0.00",
        "drRefundedAmount": None,
        "chargebackStatus": "none",
        "chargebackAmount": "0.00",
        "disputeStatus": "none",
        "refunds": [],
        "chargeRefunds": [
            {
                "chargeId": "a9ee46e8-0598-4816-8784-e48a1c1a107e",
                "entryKey": "ff5e1e6c-955e-416b-8bf1-0b0439a24ce1",
                "id": "ff5e1e6c-955e-416b-8bf1-0b0439a24ce1",
                "state": "complete",
                "amount": "5.38",
                "failureCode": None,
                "failureMessage": None,
            }
        ],
        "chargebacks": [],
        "lastEventId": "f524cae0-2527-4902-b1ff-33250329aa6b",
        "lastEventTime": "2021-10-31T02:34:02.543639Z",
    }


def test_pending_charge_entries_are_pending_money() -> None:
    entry = {"id": "cre_1", "createdTime": at(0), "amount": 5.38, "state": "pending"}
    event = published(
        "order.charge.refund.complete.json",
        type="order.charge.refund.pending",
        object={"refunds": [entry]},
    )
    out = summary([event])
    assert (out["refundStatus"], out["pendingRefundAmount"]) == ("pending", "5.38")


def test_a_failed_entry_keeps_dr_failure_code_and_message() -> None:
    entry = {
        "id": "cre_1",
        "createdTime": at(0),
        "amount": 5.38,
        "state": "failed",
        "failureCode": "refund_declined",
        "failureMessage": "The refund was declined by the issuer.",
    }
    event = published(
        "order.charge.refund.complete.json",
        type="order.charge.refund.failed",
        object={"refunds": [entry]},
    )
    out = summary([event])
    (row,) = out["chargeRefunds"]
    assert (row["failureCode"], row["failureMessage"]) == (
        "refund_declined",
        "The refund was declined by the issuer.",
    )
    assert out["refundStatus"] == "failed"


def test_the_three_views_never_undercut_each_other() -> None:
    # R (refunds) 13.51, C (charge entries) 24.80, D (DR's own figure) 21.60: the most.
    refund = published("refund.complete.json", object={"orderId": "219187180336"})
    charges = published("order.charge.refund.failed.json", object={"id": "219187180336"})
    dr = published(
        "order.refunded.json",
        object={"id": "219187180336", "currency": "USD", "payment": {"charges": []}},
    )
    out = summary([refund, charges, dr])
    assert out["refundedAmount"] == "24.80"
    assert out["drRefundedAmount"] == "21.60"


# --- 3. chargebacks and disputes ---------------------------------------------------------------


def _sale(amount: float, minute: int) -> dict[str, Any]:
    return {
        "id": f"evt-sale-{minute}",
        "type": "sales_transaction.created",
        "createdTime": at(minute),
        "liveMode": False,
        "data": {
            "object": {
                "id": f"st_{minute}",
                "type": "fraud_chargeback",
                "orderId": ORDER,
                "currency": "USD",
                "amount": amount,
            }
        },
    }


def test_a_partial_chargeback_leaves_the_rest_refundable() -> None:
    # 10.00 of 54.02 charged back, 27.01 refunded: 17.01 is still the customer's to refund.
    # v1 froze the order at charged_back.
    events = [_refund("succeeded", A, 1), _order_refunded(2, 27.01, 27.01), _sale(10.0, 3)]
    assert summary(events) == {
        "orderId": ORDER,
        "upstreamId": None,
        "currency": "USD",
        "orderState": "complete",
        "totalAmount": "54.02",
        "capturedAmount": "54.02",
        "availableToRefundAmount": "27.01",
        "refundStatus": "partially_refunded",
        "refundedAmount": "27.01",
        "pendingRefundAmount": "0.00",
        "drRefundedAmount": "27.01",
        "chargebackStatus": "partially_charged_back",
        "chargebackAmount": "10.00",
        "disputeStatus": "none",
        "refunds": [
            {
                "id": A,
                "type": None,
                "state": "succeeded",
                "amount": "27.01",
                "refundedAmount": "27.01",
                "reason": None,
                "failureReason": None,
                "items": [],
                "metadata": {},
                "expiresTime": None,
                "tokenInformation": None,
                "createdTime": "2022-03-17T21:03:59Z",
                "lastEventId": f"evt-{A}-succeeded",
                "lastEventTime": at(1),
            }
        ],
        "chargeRefunds": [],
        "chargebacks": [{"id": "st_3", "type": "fraud_chargeback", "amount": "10.00"}],
        "lastEventId": "evt-sale-3",
        "lastEventTime": at(3),
    }


def test_a_chargeback_of_all_that_refunds_left_charges_the_order_back() -> None:
    events = [_refund("succeeded", A, 1), _order_refunded(2, 27.01, 27.01), _sale(27.01, 3)]
    out = summary(events)
    assert (out["chargebackStatus"], out["refundStatus"]) == ("charged_back", "charged_back")


def test_a_chargeback_sales_transaction_alone_is_a_chargeback() -> None:
    # v1: chargebackStatus "none" next to a chargebackAmount of 27.01.
    out = summary([_sale(27.01, 1)])
    assert (out["chargebackStatus"], out["chargebackAmount"]) == ("charged_back", "27.01")


def test_dr_published_dispute_is_open_then_resolved_in_any_order() -> None:
    opened = published("order.dispute.json")
    resolved = published("order.dispute.resolved.json")
    assert summary([opened])["disputeStatus"] == "open"
    forward, backward = summary([opened, resolved]), summary([resolved, opened])
    assert forward == backward
    assert forward["disputeStatus"] == "resolved"
    assert forward["orderState"] == "accepted"
    assert (forward["capturedAmount"], forward["availableToRefundAmount"]) == ("0.32", "0.21")


# --- 4. the fields a commerce system needs ------------------------------------------------------


def test_dr_published_pending_information_refund_keeps_what_the_customer_needs() -> None:
    out = summary([published("refund.pending_information.json")])
    (refund,) = out["refunds"]
    assert refund["tokenInformation"] == {
        "token": "17bc3273-b588-420f-bd1f-49a89eec6322",
        "expiresTime": "2022-06-09T20:37:21.087000Z",
    }
    assert (refund["state"], refund["amount"]) == ("pending_information", "33")
    assert (out["currency"], out["pendingRefundAmount"], out["refundStatus"]) == (
        "JPY",
        "33",
        "pending",
    )


def test_dr_published_item_level_refund_keeps_its_items() -> None:
    out = summary([published("refund.pending-3.json")])
    (refund,) = out["refunds"]
    assert [(i["itemId"], i["quantity"], i["amount"]) for i in refund["items"]] == [
        (
            item["itemId"],
            item["quantity"],
            str(Decimal(str(item["amount"])).quantize(Decimal("0.01"))),
        )
        for item in published("refund.pending-3.json")["data"]["object"]["items"]
    ]
    assert refund["amount"] == "94.53"


def test_a_refund_keeps_its_type_metadata_and_expiry() -> None:
    event = published(
        "refund.complete.json",
        object={
            "type": "tax",
            "metadata": {"rma": "R-1001", "lines": 2},
            "expiresTime": "2022-04-17T21:04:04Z",
        },
    )
    (refund,) = summary([event])["refunds"]
    assert refund["type"] == "tax"
    assert refund["metadata"] == {"rma": "R-1001", "lines": 2}
    assert refund["expiresTime"] == "2022-04-17T21:04:04Z"


def test_dr_published_order_gives_the_merchant_order_id_state_and_captured_amount() -> None:
    out = summary([published("order.charge.refund.failed.json")])
    assert out["upstreamId"] == "fe18c37b-f76b-4eaa-892a-b1aca88cf46d"
    assert (out["orderState"], out["capturedAmount"]) == ("complete", "27.10")


def test_an_invoice_refund_is_kept_under_its_invoice() -> None:
    # DR published no such example; the Refund schema gives invoiceId instead of orderId.
    event = published("refund.complete.json", object={"orderId": None, "invoiceId": "5823594809"})
    del event["data"]["object"]["orderId"]
    state = run([event])
    assert (state.kind, state.order_id) == ("invoice", "5823594809")
    out = summarize(state)
    assert (out["orderId"], out["invoiceId"]) == (None, "5823594809")
    assert (out["refundStatus"], out["refundedAmount"]) == ("partially_refunded", "13.51")


def test_an_invoice_refund_cannot_land_on_an_order_of_the_same_id() -> None:
    order = run([published("refund.complete.json")])
    event = published("refund.failed.json", object={"orderId": None, "invoiceId": order.order_id})
    del event["data"]["object"]["orderId"]
    env = envelope(event)
    plan = interpret(env, "any")
    assert isinstance(plan, Plan)
    with pytest.raises(InvalidEvent, match="stored as an order, not an invoice"):
        apply(order, EventRef(env.createdTime, env.id), plan)


# --- bad input of the new kinds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        pytest.param(
            {"items": [{"itemId": "i1", "quantity": -1, "amount": 5.0}]},
            "quantity -1 is negative",
            id="negative-quantity",
        ),
        pytest.param(
            {"items": [{"itemId": "i1", "percent": 150, "amount": 5.0}]},
            "percent 150 is not 0-100",
            id="percent-over-100",
        ),
        pytest.param(
            {"orderId": None, "invoiceId": None},
            "a Refund needs orderId or invoiceId",
            id="neither-order-nor-invoice",
        ),
        pytest.param({"metadata": ["not", "an", "object"]}, "metadata", id="metadata-list"),
        pytest.param(
            {"items": [{"itemId": "i1", "quantity": 1.5}]},
            "quantity 1.5 is not a whole number",
            id="fractional-quantity",
        ),
        pytest.param(
            {"tokenInformation": {"token": "t" * 5000}}, "token", id="token-of-5000-characters"
        ),
    ],
)
def test_bad_refund_fields_are_refused_with_the_reason(
    changes: dict[str, Any], reason: str
) -> None:
    env = envelope(published("refund.complete.json", object=changes))
    with pytest.raises(InvalidEvent, match=reason):
        interpret(env, "any")


@pytest.mark.parametrize(
    ("field", "raw", "reason"),
    [
        # Checked before any conversion: int() of either would take minutes of CPU.
        ("quantity", "1e999999999", r"quantity 1E\+999999999 is not a whole number"),
        ("metadata", "1e999999999", r"metadata number 1E\+999999999 is out of range"),
        ("metadata", "1e400", r"metadata number 1E\+400 is out of range"),
        ("amount", "1e999999999", r"amount 1E\+999999999 is out of range"),
    ],
)
def test_huge_numbers_fail_at_once(field: str, raw: str, reason: str) -> None:
    event = published("refund.complete.json")
    obj = event["data"]["object"]
    if field == "quantity":
        obj["items"] = [{"itemId": "i1", "quantity": "RAW"}]
    elif field == "amount":
        obj["amount"] = "RAW"
    else:
        obj["metadata"] = {"n": "RAW"}
    env = Envelope.model_validate(load_json(json.dumps(event).replace('"RAW"', raw)))
    # Metadata is read when the refund is applied, items and amounts when the event is read.
    with pytest.raises(InvalidEvent, match=reason):
        _read_and_apply(env)


def _read_and_apply(env: Envelope) -> None:
    plan = interpret(env, "any")
    assert isinstance(plan, Plan)
    apply(OrderState(plan.order_id), EventRef(env.createdTime, env.id), plan)


def test_an_upstream_id_of_ten_thousand_characters_is_refused() -> None:
    env = envelope(published("order.refunded.json", object={"upstreamId": "u" * 10_000}))
    with pytest.raises(InvalidEvent, match="upstreamId"):
        interpret(env, "any")


# --- version ----------------------------------------------------------------------------------


def test_version_counts_the_events_that_changed_the_summary() -> None:
    events = [_refund("pending", A, 1), _refund("succeeded", A, 2)]
    state = run(events)
    assert state.version == 2
    # A duplicate, and an older event arriving late, change nothing and count nothing.
    assert run([*events, events[0], events[1]]).version == 2
    assert summarize(run([events[1], events[0]]))["version"] == 1


def test_an_unhandled_type_is_still_ignored() -> None:
    assert isinstance(
        interpret(envelope(published("order.refunded.json", type="order.accepted")), "any"), Ignore
    )


def test_an_older_zero_available_says_nothing_once_a_newer_order_lacks_the_figure() -> None:
    newer = published(
        "order.refunded.json",
        id="evt-order-newer",
        createdTime=at(5),
        object={"id": ORDER, "state": "complete", "payment": {"charges": []}},
    )
    for name in ("availableToRefundAmount", "refundedAmount", "totalAmount", "capturedAmount"):
        del newer["data"]["object"][name]
    events = [_refund("succeeded", A, 1), _order_refunded(3, refunded=27.01, available=0.0)]
    assert summary(events)["refundStatus"] == "refunded"
    assert summary([*events, newer])["refundStatus"] == "partially_refunded"

"""Plausible DR event histories for many orders, for end-to-end and property tests."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from models.payloads import Envelope, as_utc, load_json
from models.rules import EventRef, Ignore, OrderState, apply, interpret
from models.summary import summarize

_REFUND_PATHS = [
    ["pending", "succeeded"],
    ["pending", "failed"],
    ["pending_information", "pending", "succeeded"],
    ["pending_information", "expired"],
    ["pending"],
]
_EVENT_FOR_STATE = {
    "pending": "refund.pending",
    "pending_information": "refund.pending_information",
    "succeeded": "refund.complete",
    "failed": "refund.failed",
    "expired": "refund.updated",
}


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _amount(rng: random.Random, currency: str) -> float:
    return float(rng.randint(100, 5000)) if currency == "JPY" else rng.randint(100, 9999) / 100


def order_history(rng: random.Random, order_id: str, n_events: int) -> list[dict[str, Any]]:
    """About n_events events from one order's life, in the order DR would create them."""
    currency = rng.choice(["USD", "EUR", "JPY"])
    start = datetime(2024, 5, 1, tzinfo=UTC) + timedelta(minutes=rng.randint(0, 10_000))
    clock = [start]

    def tick() -> datetime:
        clock[0] += timedelta(seconds=rng.randint(1, 3600), microseconds=rng.randint(0, 999_999))
        return clock[0]

    events: list[dict[str, Any]] = []

    def event(kind: str, obj: dict[str, Any]) -> None:
        events.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128))),
                "type": kind,
                "createdTime": _iso(tick()),
                "liveMode": False,
                "data": {"object": obj},
                "digitalriverVersion": "2021-12-13",
            }
        )

    charge_id = str(uuid.UUID(int=rng.getrandbits(128)))
    total = _amount(rng, currency) * 3
    refunded = Decimal(0)
    while len(events) < n_events:
        refund_id = f"re_{uuid.UUID(int=rng.getrandbits(128))}"
        amount = _amount(rng, currency)
        created = _iso(tick())
        item_level = rng.random() < 0.3
        entry_time = _iso(tick())
        for state in rng.choice(_REFUND_PATHS):
            obj: dict[str, Any] = {
                "id": refund_id,
                "createdTime": created,
                "currency": currency,
                "orderId": order_id,
                "state": state,
                "reason": rng.choice(["requested_by_customer", "goodwill", "Damaged Goods"]),
                "refundedAmount": amount if state == "succeeded" else 0.0,
                "items": [{"itemId": "1", "amount": amount}] if item_level else [],
                "liveMode": False,
            }
            if not item_level:
                obj["amount"] = amount
            if state == "failed":
                obj["failureReason"] = "expired_or_canceled_card"
            event(_EVENT_FOR_STATE[state], obj)
            if state in ("pending", "succeeded", "failed"):
                entry_state = {"succeeded": "complete"}.get(state, state)
                entry: dict[str, Any] = {
                    "createdTime": entry_time,
                    "amount": amount,
                    "state": entry_state,
                }
                if rng.random() < 0.7:
                    entry["id"] = f"{charge_id[:8]}-{refund_id[-8:]}"
                kind = f"order.charge.refund.{entry_state}"
                event(
                    kind,
                    {
                        "id": charge_id,
                        "orderId": order_id,
                        "currency": currency,
                        "amount": total,
                        "state": "complete",
                        "refunds": [entry],
                    },
                )
            if state == "succeeded":
                refunded += Decimal(str(amount))
                event(
                    "order.refunded",
                    {
                        "id": order_id,
                        "currency": currency,
                        "totalAmount": total,
                        "refundedAmount": float(refunded),
                        "availableToRefundAmount": max(0.0, total - float(refunded)),
                        "state": "complete",
                    },
                )
        if rng.random() < 0.15:
            sale_id = f"st_{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}"
            event(
                "sales_transaction.created",
                {
                    "id": sale_id,
                    "orderId": order_id,
                    "currency": currency,
                    "amount": amount,
                    "type": rng.choice(["fraud_chargeback", "non_fraud_chargeback", "sale"]),
                },
            )
            if rng.random() < 0.5:
                event(
                    "order.chargeback",
                    {
                        "id": order_id,
                        "currency": currency,
                        "totalAmount": total,
                        "refundedAmount": float(refunded),
                        "availableToRefundAmount": 0.0,
                    },
                )
        if rng.random() < 0.05:
            event("order.accepted", {"id": order_id, "currency": currency})
    return events[:n_events]


def expected_summaries(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the pure rules say each order's summary must be, after every event once."""
    states: dict[str, OrderState] = {}
    for raw in events:
        envelope = Envelope.model_validate(load_json(_dumps(raw)))
        plan = interpret(envelope, "any")
        if isinstance(plan, Ignore):
            continue
        state = states.get(plan.order_id, OrderState(order_id=plan.order_id))
        states[plan.order_id] = apply(
            state, EventRef(as_utc(envelope.createdTime), envelope.id), plan
        ).state
    return {order_id: comparable(summarize(state)) for order_id, state in states.items()}


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without what depends on when and in what order its events arrived:
    `updatedAt`, and `version` (an older event arriving late changes nothing)."""
    return {k: v for k, v in summary.items() if k not in ("updatedAt", "version")}


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value)


def histories(seed: int, orders: int, per_order: int, prefix: str) -> list[dict[str, Any]]:
    """The events of `orders` orders of about `per_order` events each, order by order, each
    order id `prefix` and a random part (so runs never share an order). Event and refund
    ids come from `seed`: tests that share a database need seeds of their own, or one
    test's events are taken for copies of another's."""
    rng = random.Random(seed)
    return [
        event
        for n in range(orders)
        for event in order_history(rng, f"{prefix}-{n}-{uuid.uuid4().hex[:6]}", per_order)
    ]

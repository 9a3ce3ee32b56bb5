"""The order refund summary: the status and amounts the contract derives from an order's
state (models.rules), and its JSON shape."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from models.money import zero
from models.payloads import RefundState, iso
from models.rules import (
    PENDING_STATES,
    ChargeRefundRow,
    EventRef,
    Figure,
    OrderState,
    RefundRow,
)


def charge_refund_view(state: OrderState) -> list[ChargeRefundRow]:
    """The charge refund entries as the summary shows them.

    Rows are stored per sighting key (the entry id, else `createdTime|amount`), which
    converges trivially. Charges inside an Order often omit the entry ids their Charge
    shows, so here an id-less row is folded into the one row with an id that has the same
    charge, createdTime and amount, the greater version winning. When no such row or
    several exist (two entries alike in time and amount), it stays on its own: guessing
    would make the result depend on arrival order.
    """
    rows = dict(state.charge_refunds)
    for key, row in state.charge_refunds.items():
        if row.entry_id is not None:
            continue
        twins = [
            other
            for other in state.charge_refunds.values()
            if other.entry_id is not None
            and other.charge_id == row.charge_id
            and other.created_time == row.created_time
            and other.amount == row.amount
        ]
        if len(twins) != 1:
            continue
        (twin,) = twins
        twin_key = (twin.charge_id, twin.entry_key)
        if row.version() > rows[twin_key].version():
            rows[twin_key] = replace(row, entry_key=twin.entry_key, entry_id=twin.entry_id)
        del rows[key]
    return sorted(rows.values(), key=lambda e: (e.charge_id, e.entry_key))


def refund_status(state: OrderState) -> str:
    """The order's refundStatus, by the contract's first-rule-that-holds list."""
    refunded_total = max(refunded_amount(state), _value(state.dr_refunded) or Decimal(0))
    if state.chargeback_event is not None:
        return "charged_back"
    if refunded_total > 0:
        available, total = _value(state.dr_available), _value(state.dr_total)
        if available == 0 or (total is not None and refunded_total >= total):
            return "refunded"
        return "partially_refunded"
    refunds = state.refunds.values()
    if any(r.state in PENDING_STATES for r in refunds):
        return "pending"
    if refunds and all(r.state in (RefundState.FAILED, RefundState.EXPIRED) for r in refunds):
        return "failed"
    return "none"


def refunded_amount(state: OrderState) -> Decimal:
    """Sum of the refunded amounts of succeeded refunds."""
    return _money(
        state,
        (r.refunded_amount for r in state.refunds.values() if r.state is RefundState.SUCCEEDED),
    )


def pending_refund_amount(state: OrderState) -> Decimal:
    """Sum of the requested amounts of refunds still pending."""
    return _money(state, (r.amount for r in state.refunds.values() if r.state in PENDING_STATES))


def last_event(state: OrderState) -> EventRef | None:
    """The newest event behind the current state (a function of the state, not of arrival)."""
    refs = [
        *(r.event for r in state.refunds.values()),
        *(r.event for r in state.charge_refunds.values()),
        *(r.event for r in state.chargebacks.values()),
        *(f.event for f in (state.dr_refunded, state.dr_available, state.dr_total) if f),
    ]
    if state.chargeback_event is not None:
        refs.append(state.chargeback_event)
    return max(refs, default=None)


def summarize(state: OrderState, updated_at: datetime | None = None) -> dict[str, Any]:
    """The order refund summary, exactly in the contract's JSON shape."""
    last = last_event(state)
    return {
        "orderId": state.order_id,
        "currency": state.currency,
        "refundStatus": refund_status(state),
        "refundedAmount": str(refunded_amount(state)),
        "pendingRefundAmount": str(pending_refund_amount(state)),
        "drRefundedAmount": str(state.dr_refunded.value) if state.dr_refunded else None,
        "chargebackStatus": "charged_back" if state.chargeback_event else "none",
        "chargebackAmount": str(_money(state, (c.amount for c in state.chargebacks.values()))),
        "refunds": [
            {
                "id": r.id,
                "state": r.state.value,
                "amount": str(r.amount),
                "refundedAmount": str(r.refunded_amount),
                "reason": r.reason,
                "failureReason": r.failure_reason,
                "createdTime": iso(r.created_time),
                "lastEventId": r.event.id,
                "lastEventTime": iso(r.event.time),
            }
            for r in sorted(state.refunds.values(), key=_refund_order)
        ],
        "chargeRefunds": [
            {
                "chargeId": e.charge_id,
                "entryKey": e.entry_key,
                "state": e.state.value,
                "amount": str(e.amount),
            }
            for e in charge_refund_view(state)
        ],
        "chargebacks": [
            {"id": c.id, "type": c.type, "amount": str(c.amount)}
            for c in sorted(state.chargebacks.values(), key=lambda c: c.id)
        ],
        "lastEventId": last.id if last else None,
        "lastEventTime": iso(last.time) if last else None,
        "updatedAt": iso(updated_at),
    }


def _refund_order(row: RefundRow) -> tuple[datetime, str]:
    return (row.created_time or datetime.min.replace(tzinfo=UTC), row.id)


def _value(figure: Figure | None) -> Decimal | None:
    return figure.value if figure else None


def _money(state: OrderState, amounts: Iterable[Decimal]) -> Decimal:
    return sum(amounts, zero(state.currency))

"""The order refund summary (contract v2): the statuses and amounts the contract derives
from an order's state (models.rules), and its JSON shape.

Refunded money has three views, none of which DR ever undercuts: R, the refunds that
succeeded; C, the charge refund entries that completed; D, the order's own refundedAmount.
T, the refundable total, is the captured amount when known, else the order total.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from models.money import zero
from models.payloads import EntryState, RefundState, iso
from models.rules import (
    PENDING_STATES,
    ChargeRefundRow,
    EventRef,
    Figure,
    Note,
    OrderState,
    RefundRow,
)

_PENDING_ENTRIES = frozenset({EntryState.PENDING, EntryState.PENDING_INFORMATION})


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


def refunded_by_refunds(state: OrderState) -> Decimal:
    """R: the refunded amounts of the refunds that succeeded."""
    return _money(
        state,
        (r.refunded_amount for r in state.refunds.values() if r.state is RefundState.SUCCEEDED),
    )


def refunded_by_charges(state: OrderState) -> Decimal:
    """C: the amounts of the charge refund entries that completed."""
    return _money(
        state, (e.amount for e in charge_refund_view(state) if e.state is EntryState.COMPLETE)
    )


def refunded_amount(state: OrderState) -> Decimal:
    """max(R, C, D): the most that any of DR's views says was refunded."""
    return max(
        refunded_by_refunds(state),
        refunded_by_charges(state),
        _money(state, [_value(state.dr_refunded) or Decimal(0)]),
    )


def pending_refund_amount(state: OrderState) -> Decimal:
    """The larger of the requested amounts of pending refunds and of pending entries."""
    return max(
        _money(state, (r.amount for r in state.refunds.values() if r.state in PENDING_STATES)),
        _money(state, (e.amount for e in charge_refund_view(state) if e.state in _PENDING_ENTRIES)),
    )


def refundable_total(state: OrderState) -> Decimal | None:
    """T: the captured amount when known, else the order total; None if neither is."""
    captured = _value(state.dr_captured)
    return captured if captured is not None else _value(state.dr_total)


def chargeback_amount(state: OrderState) -> Decimal:
    """The absolute amounts of the chargeback sales transactions."""
    return _money(state, (c.amount for c in state.chargebacks.values()))


def chargeback_status(state: OrderState, refunded: Decimal | None = None) -> str:
    """`none` before any chargeback; `partially_charged_back` while money is left after
    refunds and chargebacks; else `charged_back`."""
    if state.chargeback_event is None and not state.chargebacks:
        return "none"
    total = refundable_total(state)
    charged = chargeback_amount(state)
    if refunded is None:
        refunded = refunded_amount(state)
    if total is not None and 0 < charged < total - refunded:
        return "partially_charged_back"
    return "charged_back"


def refund_status(state: OrderState) -> str:
    """The order's refundStatus, by the contract's first-rule-that-holds list."""
    refunded = refunded_amount(state)
    pending = pending_refund_amount(state)
    if chargeback_status(state, refunded) == "charged_back":
        return "charged_back"
    if refunded > 0:
        total = refundable_total(state)
        if (total is not None and refunded >= total) or _none_left(state, pending):
            return "refunded"
        return "partially_refunded"
    if pending > 0:
        return "pending"
    states: list[str] = [r.state for r in state.refunds.values()]
    states += [e.state for e in charge_refund_view(state)]
    ended = (RefundState.FAILED, RefundState.EXPIRED, EntryState.FAILED)
    if states and all(s in ended for s in states):
        return "failed"
    return "none"


def _none_left(state: OrderState, pending: Decimal) -> bool:
    """DR's newest Order shows nothing left to refund, and nothing since can have changed
    that: no refund pending (DR's figure subtracts pending refunds) and no refund or charge
    refund event newer than that Order's (a refund that failed after it gives money back)."""
    available = state.dr_available
    if available is None or available.value != 0 or pending > 0:
        return False
    # The newest Order must show it: an Order seen since without the figure says nothing
    # that keeps an older 0 true.
    orders_seen = [state.dr_refunded, state.dr_total, state.dr_captured]
    notes = [state.upstream_id, state.order_state]
    if any(seen.event > available.event for seen in [*orders_seen, *notes] if seen):
        return False
    refund_events = [r.event for r in state.refunds.values()]
    refund_events += [e.event for e in state.charge_refunds.values()]
    return all(event <= available.event for event in refund_events)


def dispute_status(state: OrderState) -> str:
    """`open` or `resolved` as the newest dispute event says; `none` before either."""
    return state.dispute_status.value if state.dispute_status else "none"


def last_event(state: OrderState) -> EventRef | None:
    """The newest event behind the current state (a function of the state, not of arrival)."""
    figures: list[Figure | Note | None] = [
        state.dr_refunded,
        state.dr_available,
        state.dr_total,
        state.dr_captured,
        state.upstream_id,
        state.order_state,
        state.dispute_status,
    ]
    refs = [
        *(r.event for r in state.refunds.values()),
        *(r.event for r in state.charge_refunds.values()),
        *(r.event for r in state.chargebacks.values()),
        *(f.event for f in figures if f),
    ]
    if state.chargeback_event is not None:
        refs.append(state.chargeback_event)
    return max(refs, default=None)


def summarize(state: OrderState, updated_at: datetime | None = None) -> dict[str, Any]:
    """The order refund summary, exactly in the contract's JSON shape (an invoice's has
    `invoiceId` and a null `orderId`)."""
    last = last_event(state)
    refunded = refunded_amount(state)
    key = (
        {"orderId": state.order_id}
        if state.kind == "order"
        else {"orderId": None, "invoiceId": state.order_id}
    )
    return {
        **key,
        "upstreamId": state.upstream_id.value if state.upstream_id else None,
        "currency": state.currency,
        "orderState": state.order_state.value if state.order_state else None,
        "totalAmount": _text(state.dr_total),
        "capturedAmount": _text(state.dr_captured),
        "availableToRefundAmount": _text(state.dr_available),
        "refundStatus": refund_status(state),
        "refundedAmount": str(refunded),
        "pendingRefundAmount": str(pending_refund_amount(state)),
        "drRefundedAmount": _text(state.dr_refunded),
        "chargebackStatus": chargeback_status(state, refunded),
        "chargebackAmount": str(chargeback_amount(state)),
        "disputeStatus": dispute_status(state),
        "refunds": [
            {
                "id": r.id,
                "type": r.type,
                "state": r.state.value,
                "amount": str(r.amount),
                "refundedAmount": str(r.refunded_amount),
                "reason": r.reason,
                "failureReason": r.failure_reason,
                "items": list(r.items),
                "metadata": r.metadata,
                "expiresTime": iso(r.expires_time),
                "tokenInformation": r.token_information,
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
                "id": e.entry_id,
                "state": e.state.value,
                "amount": str(e.amount),
                "failureCode": e.failure_code,
                "failureMessage": e.failure_message,
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
        "version": state.version,
    }


def _refund_order(row: RefundRow) -> tuple[datetime, str]:
    return (row.created_time or datetime.min.replace(tzinfo=UTC), row.id)


def _value(figure: Figure | None) -> Decimal | None:
    return figure.value if figure else None


def _text(figure: Figure | None) -> str | None:
    return str(figure.value) if figure else None


def _money(state: OrderState, amounts: Iterable[Decimal]) -> Decimal:
    return sum(amounts, zero(state.currency))

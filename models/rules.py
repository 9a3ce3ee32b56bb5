"""The pure refund rules: what an event means, and which event may replace which state.

Everything here is a function of values. The stored state of an order is a pure function
of the *set* of distinct events applied to it: each refund (and charge refund entry) keeps
the version with the greatest `(rank, event createdTime, event id)`, DR order figures keep
the newest event's value, and a chargeback never reverts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from models.errors import InvalidEvent
from models.outcome import Outcome
from models.payloads import (
    CHARGEBACK_TYPES,
    Charge,
    ChargeRefundEntry,
    EntryState,
    Envelope,
    Order,
    Refund,
    RefundState,
    SalesTransaction,
    as_utc,
    iso,
    parse_object,
)
from models.settings import LiveMode

REFUND_RANK: Mapping[RefundState, int] = {
    RefundState.PENDING_INFORMATION: 1,
    RefundState.PENDING: 2,
    RefundState.SUCCEEDED: 3,
    RefundState.FAILED: 3,
    RefundState.EXPIRED: 3,
}
ENTRY_RANK: Mapping[EntryState, int] = {
    EntryState.PENDING_INFORMATION: 1,
    EntryState.PENDING: 2,
    EntryState.COMPLETE: 3,
    EntryState.FAILED: 3,
}
PENDING_STATES = frozenset({RefundState.PENDING, RefundState.PENDING_INFORMATION})

REFUND_EVENTS = frozenset(
    {
        "refund.pending",
        "refund.pending_information",
        "refund.complete",
        "refund.failed",
        "refund.updated",
    }
)
CHARGE_REFUND_EVENTS = frozenset(
    {"order.charge.refund.pending", "order.charge.refund.complete", "order.charge.refund.failed"}
)
# What a dispute event says of the order's dispute.
DISPUTE_EVENTS: Mapping[str, str] = {"order.dispute": "open", "order.dispute.resolved": "resolved"}
HANDLED_EVENTS = (
    REFUND_EVENTS
    | CHARGE_REFUND_EVENTS
    | DISPUTE_EVENTS.keys()
    | {
        "order.refunded",
        "order.chargeback",
        "sales_transaction.created",
    }
)


@dataclass(frozen=True, order=True)
class EventRef:
    """An event's place in time: events compare by createdTime as an instant, then id."""

    time: datetime
    id: str


@dataclass(frozen=True)
class RefundRow:
    """What we keep of one DR refund. `items`, `metadata` and `token_information` are
    plain JSON values, as the summary shows them."""

    id: str
    state: RefundState
    amount: Decimal
    refunded_amount: Decimal
    reason: str | None
    failure_reason: str | None
    created_time: datetime | None
    event: EventRef
    type: str | None = None
    items: tuple[dict[str, Any], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    expires_time: datetime | None = None
    token_information: dict[str, Any] | None = None

    def version(self) -> tuple[int, EventRef]:
        return (REFUND_RANK[self.state], self.event)


@dataclass(frozen=True)
class ChargeRefundRow:
    """One refund entry of a charge. Keyed by its id, else by `createdTime|amount`."""

    charge_id: str
    entry_key: str
    entry_id: str | None
    created_time: datetime | None
    amount: Decimal
    state: EntryState
    event: EventRef
    failure_code: str | None = None
    failure_message: str | None = None

    def version(self) -> tuple[int, EventRef]:
        return (ENTRY_RANK[self.state], self.event)


@dataclass(frozen=True)
class ChargebackRow:
    """A chargeback sales transaction; amount is absolute (DR's sign is undocumented)."""

    id: str
    type: str
    amount: Decimal
    event: EventRef


@dataclass(frozen=True)
class Figure:
    """An order-level amount from DR and the event that carried it."""

    value: Decimal
    event: EventRef


@dataclass(frozen=True)
class Note:
    """An order-level word from DR (its upstream id, its state, the dispute's status) and
    the event that carried it."""

    value: str
    event: EventRef


@dataclass(frozen=True)
class OrderState:
    """Everything stored for one order, as plain values."""

    order_id: str
    # "order", or "invoice" for the refunds of an invoice (which name no order).
    kind: str = "order"
    currency: str | None = None
    refunds: Mapping[str, RefundRow] = field(default_factory=dict)
    charge_refunds: Mapping[tuple[str, str], ChargeRefundRow] = field(default_factory=dict)
    chargebacks: Mapping[str, ChargebackRow] = field(default_factory=dict)
    chargeback_event: EventRef | None = None
    dr_refunded: Figure | None = None
    dr_available: Figure | None = None
    dr_total: Figure | None = None
    dr_captured: Figure | None = None
    upstream_id: Note | None = None
    order_state: Note | None = None
    dispute_status: Note | None = None
    # One more for every event that changed the state (models.summary shows it).
    version: int = 0


@dataclass(frozen=True)
class Change:
    """One applied state change, for the history table."""

    entity: str
    entity_id: str
    from_state: str | None
    to_state: str


@dataclass(frozen=True)
class Plan:
    """What one handled event asks of one order."""

    order_id: str
    currency: str
    kind: str = "order"
    refund: Refund | None = None
    charges: tuple[Charge, ...] = ()
    order: Order | None = None
    chargeback: bool = False
    sales_transaction: SalesTransaction | None = None
    dispute: str | None = None


@dataclass(frozen=True)
class Ignore:
    """The event changes nothing, and why."""

    reason: str


@dataclass(frozen=True)
class Decision:
    """The state after an event, and what changed."""

    state: OrderState
    changes: tuple[Change, ...]

    @property
    def outcome(self) -> Outcome:
        return Outcome.APPLIED if self.changes else Outcome.STALE


def ignored_type(event_type: str) -> Ignore | None:
    """Why an event of this type is ignored whatever it holds; None for a handled type."""
    if event_type not in HANDLED_EVENTS:
        return Ignore(f"event type {event_type} is not handled")
    return None


def interpret(envelope: Envelope, live_mode: LiveMode) -> Plan | Ignore:
    """Read an event into a Plan, or say why it is ignored. Raises InvalidEvent."""
    unhandled = ignored_type(envelope.type)
    if unhandled is not None:
        return unhandled
    if live_mode != "any" and envelope.liveMode is not (live_mode == "live"):
        return Ignore(f"liveMode={envelope.liveMode} filtered by DR_LIVE_MODE={live_mode}")
    obj = envelope.data.object
    if envelope.type in REFUND_EVENTS:
        refund = parse_object(Refund, obj)
        if refund.orderId is not None:
            return Plan(order_id=refund.orderId, currency=refund.currency, refund=refund)
        if refund.invoiceId is not None:
            return Plan(
                order_id=refund.invoiceId, currency=refund.currency, kind="invoice", refund=refund
            )
        raise InvalidEvent("data.object: a Refund needs orderId or invoiceId")
    if envelope.type in CHARGE_REFUND_EVENTS:
        if "payment" in obj:
            order = parse_object(Order, obj)
            charges = order.payment.charges if order.payment else []
            return Plan(
                order_id=order.id,
                currency=order.currency,
                order=order,
                charges=tuple(c.rounded(order.currency) for c in charges),
            )
        charge = parse_object(Charge, obj)
        if charge.orderId is None or charge.currency is None:
            raise InvalidEvent("data.object: a Charge needs orderId and currency")
        currency = parse_object(Order, {"id": charge.orderId, "currency": charge.currency}).currency
        return Plan(order_id=charge.orderId, currency=currency, charges=(charge.rounded(currency),))
    if envelope.type == "order.chargeback":
        if "orderId" in obj:
            sale = parse_object(SalesTransaction, obj)
            return Plan(
                order_id=sale.orderId,
                currency=sale.currency,
                chargeback=True,
                sales_transaction=sale if sale.type in CHARGEBACK_TYPES else None,
            )
        order = parse_object(Order, obj)
        return Plan(order_id=order.id, currency=order.currency, order=order, chargeback=True)
    if envelope.type == "order.refunded":
        order = parse_object(Order, obj)
        return Plan(order_id=order.id, currency=order.currency, order=order)
    if envelope.type in DISPUTE_EVENTS:
        order = parse_object(Order, obj)
        return Plan(
            order_id=order.id,
            currency=order.currency,
            order=order,
            dispute=DISPUTE_EVENTS[envelope.type],
        )
    # sales_transaction.created: only chargebacks matter, whatever else the object holds.
    if obj.get("type") not in CHARGEBACK_TYPES:
        kind = obj.get("type")
        shown = kind[:64] if isinstance(kind, str) else type(kind).__name__
        return Ignore(f"sales transaction type {shown} is not a chargeback")
    sale = parse_object(SalesTransaction, obj)
    return Plan(order_id=sale.orderId, currency=sale.currency, sales_transaction=sale)


def apply(state: OrderState, event: EventRef, plan: Plan) -> Decision:
    """Apply one event's plan to an order's state under the convergence rule."""
    if state.kind != plan.kind:
        raise InvalidEvent(f"{plan.order_id} is stored as an {state.kind}, not an {plan.kind}")
    if state.currency is not None and state.currency != plan.currency:
        raise InvalidEvent(
            f"event currency {plan.currency} differs from order currency {state.currency}"
        )
    changes: list[Change] = []
    unchanged = state
    state = replace(state, currency=plan.currency)
    if plan.refund is not None:
        state = _apply_refund(state, event, plan.refund, changes)
    for charge in plan.charges:
        for entry in charge.refunds:
            state = _apply_entry(state, event, charge.id, entry, changes)
    if plan.order is not None:
        state = _apply_figures(state, event, plan.order, changes)
    if plan.chargeback and (state.chargeback_event is None or event < state.chargeback_event):
        # The earliest order.chargeback is kept so the stored event does not depend on
        # arrival order; the status itself never reverts.
        was = "charged_back" if state.chargeback_event else "none"
        state = replace(state, chargeback_event=event)
        changes.append(Change("order", state.order_id, was, "charged_back"))
    if plan.sales_transaction is not None:
        state = _apply_chargeback(state, event, plan.sales_transaction, changes)
    if plan.dispute is not None:
        state = _apply_note(state, "dispute_status", event, plan.dispute, changes)
    if not changes:
        return Decision(unchanged, ())
    return Decision(replace(state, version=state.version + 1), tuple(changes))


def _apply_refund(
    state: OrderState, event: EventRef, refund: Refund, changes: list[Change]
) -> OrderState:
    stored = state.refunds.get(refund.id)
    requested = refund.requested_amount()
    if refund.refundedAmount is not None:
        refunded = refund.refundedAmount
    elif refund.state is RefundState.SUCCEEDED:
        refunded = requested
    else:
        refunded = Decimal(0)
    token = refund.tokenInformation
    row = RefundRow(
        id=refund.id,
        state=refund.state,
        amount=requested,
        refunded_amount=refunded,
        reason=refund.reason,
        failure_reason=refund.failureReason,
        created_time=as_utc(refund.createdTime) if refund.createdTime else None,
        event=event,
        type=refund.type,
        items=tuple(item.view() for item in refund.items),
        metadata=plain(refund.metadata or {}),
        expires_time=refund.expiresTime,
        token_information=token.view() if token else None,
    )
    if stored is not None and row.version() <= stored.version():
        return state
    changes.append(Change("refund", refund.id, stored.state if stored else None, row.state))
    return replace(state, refunds={**state.refunds, refund.id: row})


def _entry_key(entry: ChargeRefundEntry) -> str:
    if entry.id is not None:
        return entry.id
    return f"{iso(entry.createdTime)}|{entry.amount}"


def _apply_entry(
    state: OrderState,
    event: EventRef,
    charge_id: str,
    entry: ChargeRefundEntry,
    changes: list[Change],
) -> OrderState:
    key = _entry_key(entry)
    stored = state.charge_refunds.get((charge_id, key))
    row = ChargeRefundRow(
        charge_id=charge_id,
        entry_key=key,
        entry_id=entry.id,
        created_time=as_utc(entry.createdTime) if entry.createdTime else None,
        amount=entry.amount,
        state=entry.state,
        event=event,
        failure_code=entry.failureCode,
        failure_message=entry.failureMessage,
    )
    if stored is not None and row.version() <= stored.version():
        return state
    changes.append(
        Change("charge_refund", f"{charge_id}/{key}", stored.state if stored else None, row.state)
    )
    return replace(state, charge_refunds={**state.charge_refunds, (charge_id, key): row})


_FIGURES = (
    ("dr_refunded", "refundedAmount"),
    ("dr_available", "availableToRefundAmount"),
    ("dr_total", "totalAmount"),
    ("dr_captured", "capturedAmount"),
)
_NOTES = (("upstream_id", "upstreamId"), ("order_state", "state"))


def _apply_figures(
    state: OrderState, event: EventRef, order: Order, changes: list[Change]
) -> OrderState:
    for attr, dr_name in _FIGURES:
        value: Decimal | None = getattr(order, dr_name)
        stored: Figure | None = getattr(state, attr)
        if value is None or (stored is not None and event <= stored.event):
            continue
        updates: dict[str, Any] = {attr: Figure(value, event)}
        state = replace(state, **updates)
        changes.append(
            Change(
                "order_figure",
                f"{state.order_id}/{dr_name}",
                str(stored.value) if stored else None,
                str(value),
            )
        )
    for attr, dr_name in _NOTES:
        text: str | None = getattr(order, dr_name)
        if text is not None:
            state = _apply_note(state, attr, event, text, changes)
    return state


def _apply_note(
    state: OrderState, attr: str, event: EventRef, value: str, changes: list[Change]
) -> OrderState:
    """Keep `value` as the order's `attr` if `event` is newer than the one it has."""
    stored: Note | None = getattr(state, attr)
    if stored is not None and event <= stored.event:
        return state
    updates: dict[str, Any] = {attr: Note(value, event)}
    changes.append(Change("order_" + attr, state.order_id, stored.value if stored else None, value))
    return replace(state, **updates)


def plain(value: Any) -> Any:
    """A parsed JSON value with its exact decimals made plain numbers, as JSON columns
    store them (metadata is the merchant's own key/value data, not money)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, Decimal):
        # Checked first: int() of 1e999999999 would take minutes, float() of 1e400 is inf.
        if not value.copy_abs() < _PLAIN_LIMIT:
            raise InvalidEvent(f"metadata number {str(value)[:32]} is out of range")
        if value.copy_abs() < _INT_LIMIT and value == value.to_integral_value():
            return int(value)
        return float(value)
    return value


_PLAIN_LIMIT = Decimal("1e300")
_INT_LIMIT = Decimal(10**18)


def _apply_chargeback(
    state: OrderState, event: EventRef, sale: SalesTransaction, changes: list[Change]
) -> OrderState:
    stored = state.chargebacks.get(sale.id)
    if stored is not None and event <= stored.event:
        return state
    row = ChargebackRow(id=sale.id, type=sale.type, amount=abs(sale.amount), event=event)
    changes.append(Change("chargeback", sale.id, stored.type if stored else None, sale.type))
    return replace(state, chargebacks={**state.chargebacks, sale.id: row})

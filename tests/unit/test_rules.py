"""Table-driven tests of the pure refund rules (models.rules): no I/O, no database.

Events are written as DR envelopes (dicts or the example fixtures), parsed exactly as the
worker parses them, read with `interpret`, and applied with `apply`.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from models.errors import InvalidEvent
from models.outcome import Outcome
from models.payloads import Envelope, as_utc, load_json
from models.rules import Decision, EventRef, Ignore, OrderState, Plan, apply, interpret
from models.settings import LiveMode
from models.summary import summarize
from tests.eventgen import comparable

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dr_examples"
STORY = (
    "01_refund_pending.json",
    "02_order_charge_refund_pending.json",
    "03_order_charge_refund_complete.json",
    "04_refund_complete.json",
    "05_order_refunded.json",
    "06_refund_failed.json",
    "07_sales_transaction_created.json",
    "08_order_chargeback.json",
)
ORDER_ID = "241500010336"
T0 = datetime(2024, 5, 14, 10, 0, tzinfo=UTC)
REFUND_EVENT_FOR_STATE = {
    "pending_information": "refund.pending_information",
    "pending": "refund.pending",
    "succeeded": "refund.complete",
    "failed": "refund.failed",
    # DR sends no refund.expired; an expired refund shows up in refund.updated.
    "expired": "refund.updated",
}
_event_ids = itertools.count(1)


# --- building and applying events ---------------------------------------------------------


def at(seconds: float) -> str:
    """An event time `seconds` after T0, written as DR writes it."""
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def event(
    type_: str,
    obj: dict[str, Any],
    when: str,
    *,
    event_id: str | None = None,
    live: bool | None = False,
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "id": event_id or f"evt-{next(_event_ids):05d}",
        "type": type_,
        "data": {"object": obj},
        "createdTime": when,
        "digitalriverVersion": "2021-12-13",
    }
    if live is not None:
        env["liveMode"] = live
    return env


def refund_obj(
    state: str,
    *,
    refund_id: str = "re_A",
    amount: float | None = 27.01,
    refunded: float | None = None,
    items: Sequence[float] | None = None,
    currency: str = "USD",
    order_id: str | None = ORDER_ID,
    reason: str | None = "requested_by_customer",
    failure_reason: str | None = None,
    created: str = "2024-05-14T10:02:10Z",
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": refund_id,
        "createdTime": created,
        "currency": currency,
        "state": state,
        "liveMode": False,
    }
    if order_id is not None:
        obj["orderId"] = order_id
    if amount is not None:
        obj["amount"] = amount
    if items is not None:
        obj["items"] = [
            {"itemId": f"item-{n}", "quantity": 1, "amount": a, "refundedAmount": 0.0}
            for n, a in enumerate(items)
        ]
    if refunded is not None:
        obj["refundedAmount"] = refunded
    if reason is not None:
        obj["reason"] = reason
    if failure_reason is not None:
        obj["failureReason"] = failure_reason
    return obj


def refund_event(
    state: str, when: str, *, type_: str | None = None, event_id: str | None = None, **kw: Any
) -> dict[str, Any]:
    """A refund event; the type follows the state unless given."""
    if "refunded" not in kw and "amount" not in kw and "items" not in kw:
        kw["refunded"] = 27.01 if state == "succeeded" else 0.0
    return event(
        type_ or REFUND_EVENT_FOR_STATE[state], refund_obj(state, **kw), when, event_id=event_id
    )


def entry(
    state: str, created: str | None, amount: float, entry_id: str | None = None
) -> dict[str, Any]:
    e: dict[str, Any] = {"amount": amount, "state": state}
    if entry_id is not None:
        e["id"] = entry_id
    if created is not None:
        e["createdTime"] = created
    return e


def charge_obj(
    entries: Sequence[dict[str, Any]],
    *,
    charge_id: str = "ch_1",
    currency: str | None = "USD",
    order_id: str | None = ORDER_ID,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": charge_id,
        "amount": 54.02,
        "state": "complete",
        "captured": True,
        "refunded": True,
        "refunds": list(entries),
    }
    if currency is not None:
        obj["currency"] = currency
    if order_id is not None:
        obj["orderId"] = order_id
    return obj


def order_obj(
    *,
    refunded: float | None = None,
    available: float | None = None,
    total: float | None = 54.02,
    charges: Sequence[dict[str, Any]] | None = None,
    currency: str = "USD",
    order_id: str = ORDER_ID,
    state: str | None = "complete",
) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": order_id, "currency": currency}
    if state is not None:
        obj["state"] = state
    for name, value in (
        ("totalAmount", total),
        ("refundedAmount", refunded),
        ("availableToRefundAmount", available),
    ):
        if value is not None:
            obj[name] = value
    if charges is not None:
        obj["payment"] = {"charges": list(charges)}
    return obj


def sale_obj(
    type_: str = "fraud_chargeback",
    amount: float = 27.01,
    *,
    sale_id: str = "st_1",
    currency: str = "USD",
) -> dict[str, Any]:
    return {
        "id": sale_id,
        "type": type_,
        "orderId": ORDER_ID,
        "currency": currency,
        "amount": amount,
        "lineItemId": "170000020336",
        "liveMode": False,
    }


def parse(env: dict[str, Any]) -> Envelope:
    return Envelope.model_validate(load_json(json.dumps(env)))


def load_fixture(name: str) -> Envelope:
    return Envelope.model_validate(load_json((FIXTURES / name).read_bytes()))


def ref(env: Envelope) -> EventRef:
    return EventRef(as_utc(env.createdTime), env.id)


def as_env(env: Envelope | dict[str, Any]) -> Envelope:
    return env if isinstance(env, Envelope) else parse(env)


def plan_of(env: Envelope, live_mode: LiveMode = "any") -> Plan:
    plan = interpret(env, live_mode)
    assert isinstance(plan, Plan), plan
    return plan


def step(state: OrderState, env: Envelope | dict[str, Any]) -> Decision:
    parsed = as_env(env)
    return apply(state, ref(parsed), plan_of(parsed))


def run(events: Iterable[Envelope | dict[str, Any]], state: OrderState | None = None) -> OrderState:
    """Apply the events in the given order, skipping ignored ones."""
    state = state or OrderState(ORDER_ID)
    for env in events:
        parsed = as_env(env)
        plan = interpret(parsed, "any")
        if isinstance(plan, Ignore):
            continue
        state = apply(state, ref(parsed), plan).state
    return state


def summary(events: Iterable[Envelope | dict[str, Any]]) -> dict[str, Any]:
    return summarize(run(events), updated_at=None)


def run_every_order(events: Sequence[dict[str, Any]]) -> OrderState:
    """Apply the events in every order of arrival; all must give the same state, but for
    its version (how many of them changed it, which depends on their order)."""
    parsed = [parse(e) for e in events]
    states = [run(order) for order in itertools.permutations(parsed)]
    first = states[0]
    for state in states[1:]:
        assert replace(state, version=0) == replace(first, version=0)
        assert comparable(summarize(state)) == comparable(summarize(first))
    return first


# --- refund convergence ---------------------------------------------------------------------

RANK_CASES = [
    pytest.param("pending_information", "pending", "pending", id="pending-info-then-pending"),
    pytest.param("pending", "pending_information", "pending", id="late-pending-info-loses"),
    pytest.param("pending", "succeeded", "succeeded", id="pending-then-succeeded"),
    pytest.param("succeeded", "pending", "succeeded", id="late-pending-never-reopens"),
    pytest.param("failed", "pending_information", "failed", id="late-pending-info-after-failed"),
    pytest.param("expired", "pending", "expired", id="late-pending-after-expired"),
    pytest.param("pending_information", "expired", "expired", id="pending-info-then-expired"),
    pytest.param("succeeded", "failed", "failed", id="final-states-newer-wins-failed"),
    pytest.param("failed", "succeeded", "succeeded", id="final-states-newer-wins-succeeded"),
    pytest.param("expired", "succeeded", "succeeded", id="expired-then-succeeded"),
    pytest.param("succeeded", "expired", "expired", id="succeeded-then-expired"),
]


@pytest.mark.parametrize(("older", "newer", "winner"), RANK_CASES)
@pytest.mark.parametrize("arrival", ["in-order", "reversed"])
def test_refund_state_follows_rank_then_time(
    older: str, newer: str, winner: str, arrival: str
) -> None:
    events = [refund_event(older, at(0)), refund_event(newer, at(60))]
    if arrival == "reversed":
        events.reverse()
    (row,) = summary(events)["refunds"]
    assert row["state"] == winner


@pytest.mark.parametrize(
    ("first", "second", "winner_id"),
    [
        pytest.param(
            ("evt-a", "2024-05-14T10:00:00Z"),
            ("evt-b", "2024-05-14T10:00:00Z"),
            "evt-b",
            id="same-time-greater-id-wins",
        ),
        pytest.param(
            ("evt-b", "2024-05-14T10:00:00.000000Z"),
            ("evt-a", "2024-05-14T12:00:00+02:00"),
            "evt-b",
            id="same-instant-other-offset-id-decides",
        ),
        pytest.param(
            ("evt-z", "2024-05-14T10:00:00.499999Z"),
            ("evt-a", "2024-05-14T10:00:00.5Z"),
            "evt-a",
            id="later-fraction-beats-greater-id",
        ),
        pytest.param(
            ("evt-z", "2024-05-14T11:00:00+02:00"),
            ("evt-a", "2024-05-14T10:00:00Z"),
            "evt-a",
            id="time-compared-as-instant-not-text",
        ),
    ],
)
@pytest.mark.parametrize("states", [("succeeded", "failed"), ("pending", "pending")])
def test_equal_rank_is_decided_by_event_time_then_id(
    first: tuple[str, str], second: tuple[str, str], winner_id: str, states: tuple[str, str]
) -> None:
    events = [
        refund_event(states[0], first[1], event_id=first[0], reason=f"from {first[0]}"),
        refund_event(states[1], second[1], event_id=second[0], reason=f"from {second[0]}"),
    ]
    for order in (events, events[::-1]):
        (row,) = summary(order)["refunds"]
        assert row["lastEventId"] == winner_id
        assert row["reason"] == f"from {winner_id}"


def test_refunds_are_independent_of_each_other() -> None:
    state = run_every_order(
        [
            refund_event("pending", at(0), refund_id="re_A"),
            refund_event("succeeded", at(10), refund_id="re_A", refunded=27.01),
            refund_event("pending", at(20), refund_id="re_B", amount=5.0),
        ]
    )
    assert {r.id: r.state.value for r in state.refunds.values()} == {
        "re_A": "succeeded",
        "re_B": "pending",
    }


# --- stale events ------------------------------------------------------------------------------

_SUCCEEDED = refund_event("succeeded", at(100), event_id="evt-succeeded", refunded=27.01)
_FIGURES_NEW = event("order.refunded", order_obj(refunded=27.01, available=27.01), at(100))
_SALE_NEW = event("sales_transaction.created", sale_obj(amount=27.01), at(100))
_ENTRY_DONE = event(
    "order.charge.refund.complete",
    charge_obj([entry("complete", at(-5), 27.01, "cre_1")]),
    at(100),
)


def test_older_id_less_sighting_is_kept_but_changes_no_summary() -> None:
    # Sightings are stored per key so rows converge; the older id-less one folds into the
    # entry with the id and the summary stays as it was.
    state = run([_ENTRY_DONE])
    late = event(
        "order.charge.refund.pending",
        order_obj(total=None, charges=[charge_obj([entry("pending", at(-5), 27.01)])]),
        at(10),
    )
    decision = step(state, late)
    assert len(decision.state.charge_refunds) == len(state.charge_refunds) + 1
    assert summarize(decision.state)["chargeRefunds"] == summarize(state)["chargeRefunds"]


@pytest.mark.parametrize(
    ("before", "late"),
    [
        pytest.param([_SUCCEEDED], refund_event("pending", at(0)), id="older-pending-refund"),
        pytest.param([_SUCCEEDED], refund_event("pending", at(200)), id="newer-lower-rank"),
        pytest.param(
            [_SUCCEEDED], refund_event("failed", at(50)), id="older-final-state-same-rank"
        ),
        pytest.param([_SUCCEEDED], _SUCCEEDED, id="duplicate-delivery"),
        pytest.param(
            [_FIGURES_NEW],
            event("order.refunded", order_obj(refunded=10.0, available=44.02), at(50)),
            id="older-order-figures",
        ),
        pytest.param(
            [_SALE_NEW],
            event("sales_transaction.created", sale_obj(amount=5.0), at(50)),
            id="older-sales-transaction",
        ),
        pytest.param(
            [_ENTRY_DONE],
            event(
                "order.charge.refund.pending",
                charge_obj([entry("pending", at(-5), 27.01, "cre_1")]),
                at(10),
            ),
            id="older-charge-refund-entry",
        ),
        pytest.param(
            [_ENTRY_DONE],
            event(
                "order.refunded",
                order_obj(
                    total=None, state=None, charges=[charge_obj([entry("pending", at(-5), 27.01)])]
                ),
                at(10),
            ),
            id="order-refunded-charges-are-not-charge-events",
        ),
    ],
)
def test_stale_event_changes_nothing(before: list[dict[str, Any]], late: dict[str, Any]) -> None:
    state = run(before)
    decision = step(state, late)
    assert decision.outcome is Outcome.STALE
    assert decision.changes == ()
    assert decision.state == state
    assert summarize(decision.state) == summarize(state)


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(refund_event("pending", at(0)), id="first-refund-event"),
        pytest.param(_FIGURES_NEW, id="first-order-figures"),
        pytest.param(_SALE_NEW, id="first-chargeback-sale"),
        pytest.param(_ENTRY_DONE, id="first-charge-refund-entry"),
        pytest.param(event("order.chargeback", order_obj(), at(0)), id="first-chargeback"),
    ],
)
def test_first_sight_of_anything_is_applied(env: dict[str, Any]) -> None:
    decision = step(OrderState(ORDER_ID), env)
    assert decision.outcome is Outcome.APPLIED
    assert decision.changes


# --- refund amounts -----------------------------------------------------------------------


def test_refund_pending_event_with_succeeded_object_counts_as_succeeded() -> None:
    env = refund_event("succeeded", at(0), type_="refund.pending", refunded=27.01)
    out = summary([env])
    assert out["refunds"][0]["state"] == "succeeded"
    assert out["refundedAmount"] == "27.01"
    assert out["pendingRefundAmount"] == "0.00"
    assert out["refundStatus"] == "partially_refunded"


@pytest.mark.parametrize(
    ("kwargs", "requested", "refunded_sum", "pending_sum"),
    [
        pytest.param(
            {"state": "pending", "amount": None, "items": [27.01], "refunded": 0.0},
            "27.01",
            "0.00",
            "27.01",
            id="item-level-pending",
        ),
        pytest.param(
            {"state": "pending_information", "amount": None, "items": [25.0, 2.01, 5.0]},
            "32.01",
            "0.00",
            "32.01",
            id="item-level-pending-information-several-items",
        ),
        pytest.param(
            {"state": "succeeded", "amount": None, "items": [25.0, 2.01], "refunded": 27.01},
            "27.01",
            "27.01",
            "0.00",
            id="item-level-succeeded",
        ),
        pytest.param(
            {"state": "succeeded", "amount": None, "items": [25.0, 2.01]},
            "27.01",
            "27.01",
            "0.00",
            id="succeeded-without-refunded-amount-uses-items",
        ),
        pytest.param(
            {"state": "succeeded", "amount": 5.0},
            "5.00",
            "5.00",
            "0.00",
            id="succeeded-without-refunded-amount-uses-amount",
        ),
        pytest.param(
            {"state": "pending", "amount": 10.0, "items": [27.01]},
            "10.00",
            "0.00",
            "10.00",
            id="top-level-amount-wins-over-items",
        ),
        pytest.param(
            {"state": "failed", "amount": None, "items": [27.01], "refunded": 0.0},
            "27.01",
            "0.00",
            "0.00",
            id="item-level-failed-counts-nowhere",
        ),
    ],
)
def test_requested_amount_falls_back_to_items(
    kwargs: dict[str, Any], requested: str, refunded_sum: str, pending_sum: str
) -> None:
    state = kwargs["state"]
    fields = {k: v for k, v in kwargs.items() if k != "state"}
    out = summary([event(REFUND_EVENT_FOR_STATE[state], refund_obj(state, **fields), at(0))])
    assert out["refunds"][0]["amount"] == requested
    assert out["refundedAmount"] == refunded_sum
    assert out["pendingRefundAmount"] == pending_sum


@pytest.mark.parametrize(
    ("currency", "raw", "expected"),
    [
        pytest.param("USD", 53.769999999999996, "53.77", id="usd-float-noise"),
        pytest.param("USD", 27.01, "27.01", id="usd-exact"),
        pytest.param("USD", 5.0, "5.00", id="usd-one-decimal"),
        pytest.param("USD", 0.005, "0.00", id="usd-half-even-down"),
        pytest.param("USD", 0.015, "0.02", id="usd-half-even-up"),
        pytest.param("usd", 12.5, "12.50", id="lowercase-currency"),
        pytest.param("JPY", 33.0, "33", id="jpy-no-minor-unit"),
        pytest.param("JPY", 3300.4, "3300", id="jpy-rounds-to-integer"),
        pytest.param("BHD", 1.2345, "1.234", id="bhd-three-decimals"),
    ],
)
def test_amounts_round_to_the_currency_minor_unit(currency: str, raw: float, expected: str) -> None:
    env = parse(
        refund_event("succeeded", at(0), amount=raw, refunded=raw, currency=currency, items=[raw])
    )
    # load_json keeps the JSON number exactly as written before rounding.
    assert env.data.object["amount"] == Decimal(repr(raw))
    out = summary([env])
    assert out["currency"] == currency.upper()
    assert out["refunds"][0]["amount"] == expected
    assert out["refunds"][0]["refundedAmount"] == expected
    assert out["refundedAmount"] == expected


@pytest.mark.parametrize(
    ("currency", "raw", "expected"),
    [
        pytest.param("USD", 53.769999999999996, "53.77", id="usd"),
        pytest.param("JPY", 33.0, "33", id="jpy"),
    ],
)
def test_every_amount_kind_is_rounded(currency: str, raw: float, expected: str) -> None:
    events = [
        event(
            "order.charge.refund.pending",
            charge_obj([entry("pending", at(-5), raw, "cre_1")], currency=currency),
            at(0),
        ),
        event(
            "order.refunded",
            order_obj(refunded=raw, available=raw, total=raw, currency=currency),
            at(1),
        ),
        event("sales_transaction.created", sale_obj(amount=-raw, currency=currency), at(2)),
        refund_event(
            "pending", at(3), refund_id="re_P", amount=raw, refunded=0.0, currency=currency
        ),
    ]
    state = run(events)
    out = summarize(state)
    assert out["chargeRefunds"][0]["amount"] == expected
    assert out["drRefundedAmount"] == expected
    assert str(state.dr_available.value if state.dr_available else None) == expected
    assert str(state.dr_total.value if state.dr_total else None) == expected
    assert out["chargebacks"][0]["amount"] == expected
    assert out["chargebackAmount"] == expected
    assert out["pendingRefundAmount"] == expected
    # Contract v2: DR's own refundedAmount (D) counts, though no refund succeeded.
    assert out["refundedAmount"] == expected


# --- invalid events ----------------------------------------------------------------------


def _without(obj: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in names}


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(refund_event("pending", at(0), currency="XYZ"), id="refund-unknown-currency"),
        pytest.param(refund_event("pending", at(0), currency="US"), id="refund-short-currency"),
        pytest.param(
            event("order.charge.refund.pending", charge_obj([], currency="ABC"), at(0)),
            id="charge-unknown-currency",
        ),
        pytest.param(
            event("order.refunded", order_obj(currency="QQQ"), at(0)),
            id="order-unknown-currency",
        ),
        pytest.param(
            event("sales_transaction.created", sale_obj(currency="ZZZ"), at(0)),
            id="sales-transaction-unknown-currency",
        ),
        pytest.param(refund_event("pending", at(0), amount=-5.0), id="negative-refund-amount"),
        pytest.param(
            refund_event("succeeded", at(0), amount=5.0, refunded=-5.0),
            id="negative-refunded-amount",
        ),
        pytest.param(
            refund_event("pending", at(0), amount=None, items=[27.01, -2.0]),
            id="negative-item-amount",
        ),
        pytest.param(
            event(
                "order.charge.refund.pending",
                charge_obj([entry("pending", at(-5), -27.01, "cre_1")]),
                at(0),
            ),
            id="negative-charge-refund-entry",
        ),
        pytest.param(refund_event("pending", at(0), amount=1e16), id="refund-amount-out-of-range"),
        pytest.param(
            event("refund.pending", _without(refund_obj("pending"), "id"), at(0)),
            id="refund-without-id",
        ),
        pytest.param(
            event("refund.complete", {**refund_obj("succeeded"), "id": ""}, at(0)),
            id="refund-with-empty-id",
        ),
        pytest.param(
            event("order.charge.refund.complete", _without(charge_obj([]), "id"), at(0)),
            id="charge-without-id",
        ),
        pytest.param(
            event("order.refunded", _without(order_obj(), "id"), at(0)),
            id="order-refunded-without-id",
        ),
        pytest.param(
            event("order.chargeback", _without(order_obj(), "id"), at(0)),
            id="order-chargeback-without-id",
        ),
        pytest.param(
            event(
                "order.charge.refund.failed",
                _without(order_obj(charges=[charge_obj([])]), "id"),
                at(0),
            ),
            id="charge-event-order-without-id",
        ),
        pytest.param(
            event("sales_transaction.created", _without(sale_obj(), "id"), at(0)),
            id="sales-transaction-without-id",
        ),
        pytest.param(
            event("refund.pending", _without(refund_obj("pending"), "currency"), at(0)),
            id="refund-without-currency",
        ),
        pytest.param(
            event("refund.pending", refund_obj("refunded"), at(0)),
            id="refund-unknown-state",
        ),
        pytest.param(
            event("order.charge.refund.pending", charge_obj([], order_id=None), at(0)),
            id="charge-without-order-id",
        ),
        pytest.param(
            event("order.charge.refund.pending", charge_obj([], currency=None), at(0)),
            id="charge-without-currency",
        ),
        pytest.param(
            event("order.charge.refund.pending", charge_obj([entry("pending", None, 5.0)]), at(0)),
            id="entry-without-id-or-created-time",
        ),
        pytest.param(
            event("sales_transaction.created", _without(sale_obj(), "amount"), at(0)),
            id="sales-transaction-without-amount",
        ),
        pytest.param(
            event("order.refunded", order_obj(refunded=-27.01), at(0)),
            id="order-negative-refunded-amount",
        ),
        pytest.param(
            event("order.refunded", order_obj(available=-1.0), at(0)),
            id="order-negative-available-to-refund",
        ),
        pytest.param(
            event("order.chargeback", order_obj(total=-54.02), at(0)),
            id="order-negative-total-amount",
        ),
    ],
)
def test_invalid_event_raises_invalid_event(env: dict[str, Any]) -> None:
    parsed = parse(env)  # the envelope itself is fine; its object is not
    with pytest.raises(InvalidEvent):
        step(OrderState(ORDER_ID), parsed)


@pytest.mark.parametrize(
    "late",
    [
        pytest.param(
            refund_event("pending", at(10), refund_id="re_B", currency="EUR"),
            id="refund-in-other-currency",
        ),
        pytest.param(
            event("order.charge.refund.pending", charge_obj([], currency="EUR"), at(10)),
            id="charge-in-other-currency",
        ),
        pytest.param(
            event("order.refunded", order_obj(currency="JPY", total=5402.0), at(10)),
            id="order-in-other-currency",
        ),
        pytest.param(
            event("sales_transaction.created", sale_obj(currency="GBP"), at(10)),
            id="sales-transaction-in-other-currency",
        ),
        pytest.param(
            refund_event("pending", at(-10), currency="EUR"),
            id="older-event-in-other-currency",
        ),
    ],
)
def test_currency_mismatch_with_the_order_raises(late: dict[str, Any]) -> None:
    state = run([refund_event("pending", at(0))])
    assert state.currency == "USD"
    with pytest.raises(InvalidEvent):
        step(state, late)


# --- ignored events and live mode -------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(event("order.accepted", order_obj(), at(0)), id="order-accepted"),
        pytest.param(event("order.charge.capture.complete", charge_obj([]), at(0)), id="capture"),
        pytest.param(event("refund.created", refund_obj("pending"), at(0)), id="legacy-created"),
        pytest.param(
            event("order.charge.refund.created", charge_obj([]), at(0)),
            id="legacy-charge-refund-created",
        ),
        pytest.param(event("invoice.created", {"nonsense": True}, at(0)), id="unknown-garbage"),
        pytest.param(event("order.refunded.v2", {}, at(0)), id="unknown-suffix"),
        pytest.param(
            event("sales_transaction.created", sale_obj("sale", 27.01), at(0)),
            id="sales-transaction-sale",
        ),
        pytest.param(
            event("sales_transaction.created", sale_obj("refund", -27.01), at(0)),
            id="sales-transaction-refund",
        ),
        pytest.param(
            event("sales_transaction.created", sale_obj("return", -27.01), at(0)),
            id="sales-transaction-return",
        ),
    ],
)
def test_unhandled_events_are_ignored(env: dict[str, Any]) -> None:
    result = interpret(parse(env), "any")
    assert isinstance(result, Ignore)
    assert result.reason


@pytest.mark.parametrize(
    ("live_mode", "event_live", "applied"),
    [
        pytest.param("live", False, False, id="live-ignores-test-event"),
        pytest.param("live", True, True, id="live-applies-live-event"),
        pytest.param("test", True, False, id="test-ignores-live-event"),
        pytest.param("test", False, True, id="test-applies-test-event"),
        pytest.param("any", True, True, id="any-applies-live-event"),
        pytest.param("any", False, True, id="any-applies-test-event"),
    ],
)
@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(("refund.pending", refund_obj("pending")), id="refund"),
        pytest.param(("order.chargeback", order_obj()), id="chargeback"),
        pytest.param(("sales_transaction.created", sale_obj()), id="sales-transaction"),
    ],
)
def test_live_mode_filter(
    live_mode: LiveMode, event_live: bool, applied: bool, obj: tuple[str, dict[str, Any]]
) -> None:
    env = parse(event(obj[0], obj[1], at(0), live=event_live))
    result = interpret(env, live_mode)
    assert isinstance(result, Plan) is applied
    assert isinstance(result, Ignore) is not applied


def test_story_in_live_mode_ignores_every_test_event() -> None:
    for name in STORY:
        assert isinstance(interpret(load_fixture(name), "live"), Ignore), name


# --- charge refund entries ----------------------------------------------------------------------


def test_two_entries_with_the_same_amount_at_different_times_stay_two() -> None:
    one_charge = event(
        "order.charge.refund.pending",
        charge_obj([entry("pending", at(-60), 5.0), entry("pending", at(-30), 5.0)]),
        at(0),
    )
    out = summary([one_charge])
    assert len(out["chargeRefunds"]) == 2
    assert {e["amount"] for e in out["chargeRefunds"]} == {"5.00"}
    # Seen in two separate events, and then again in an Order snapshot without ids.
    state = run_every_order(
        [
            event(
                "order.charge.refund.pending",
                charge_obj([entry("pending", at(-60), 5.0)]),
                at(0),
            ),
            event(
                "order.charge.refund.complete",
                charge_obj([entry("complete", at(-30), 5.0)]),
                at(10),
            ),
            event(
                "order.charge.refund.failed",
                order_obj(
                    charges=[
                        charge_obj([entry("failed", at(-60), 5.0), entry("complete", at(-30), 5.0)])
                    ]
                ),
                at(20),
            ),
        ]
    )
    rows = sorted(summarize(state)["chargeRefunds"], key=lambda e: e["entryKey"])
    assert [(e["state"], e["amount"]) for e in rows] == [("failed", "5.00"), ("complete", "5.00")]


def test_entries_with_the_same_time_but_other_amounts_stay_two() -> None:
    out = summary(
        [
            event(
                "order.charge.refund.pending",
                charge_obj([entry("pending", at(-60), 5.0), entry("pending", at(-60), 5.01)]),
                at(0),
            )
        ]
    )
    assert sorted(e["amount"] for e in out["chargeRefunds"]) == ["5.00", "5.01"]


def test_entries_of_different_charges_are_different() -> None:
    out = summary(
        [
            event(
                "order.charge.refund.pending",
                charge_obj([entry("pending", at(-60), 5.0)], charge_id="ch_1"),
                at(0),
            ),
            event(
                "order.charge.refund.pending",
                charge_obj([entry("pending", at(-60), 5.0)], charge_id="ch_2"),
                at(1),
            ),
        ]
    )
    assert [e["chargeId"] for e in out["chargeRefunds"]] == ["ch_1", "ch_2"]


ENTRY_CREATED = "2024-05-14T10:04:40Z"
_CHARGE_PENDING = event(
    "order.charge.refund.pending",
    charge_obj([entry("pending", ENTRY_CREATED, 27.01, "cre_1")]),
    at(281),
)
_CHARGE_COMPLETE = event(
    "order.charge.refund.complete",
    charge_obj([entry("complete", ENTRY_CREATED, 27.01, "cre_1")]),
    at(8000),
)


def _order_with_entry(state: str, when: str, *, created: str = ENTRY_CREATED) -> dict[str, Any]:
    return event(
        f"order.charge.refund.{state}",
        order_obj(charges=[charge_obj([entry(state, created, 27.01)], currency=None)]),
        when,
    )


@pytest.mark.parametrize(
    ("events", "state"),
    [
        pytest.param(
            [_CHARGE_PENDING, _order_with_entry("complete", at(9000))],
            "complete",
            id="id-less-newer-complete-in-order",
        ),
        pytest.param(
            [_CHARGE_COMPLETE, _order_with_entry("pending", at(300))],
            "complete",
            id="id-less-older-pending-in-order",
        ),
        pytest.param(
            [_CHARGE_PENDING, _order_with_entry("complete", at(100))],
            "complete",
            id="id-less-higher-rank-but-older-event",
        ),
        pytest.param(
            [_CHARGE_COMPLETE, _order_with_entry("failed", at(9000))],
            "failed",
            id="id-less-same-rank-newer-event",
        ),
        pytest.param(
            [
                _CHARGE_PENDING,
                _order_with_entry("complete", at(9000)),
                _order_with_entry("pending", at(200)),
            ],
            "complete",
            id="two-id-less-snapshots-and-the-charge",
        ),
        pytest.param(
            [
                _CHARGE_PENDING,
                _CHARGE_COMPLETE,
                _order_with_entry("complete", at(9000), created="2024-05-14T12:04:40+02:00"),
            ],
            "complete",
            id="created-time-in-another-offset",
        ),
    ],
)
def test_id_less_entry_in_order_matches_the_entry_with_id(
    events: list[dict[str, Any]], state: str
) -> None:
    final = run_every_order(events)
    # Stored per sighting key (converges trivially); shown as one entry.
    assert {key for _, key in final.charge_refunds} == {"cre_1", f"{ENTRY_CREATED}|27.01"}
    (row,) = summarize(final)["chargeRefunds"]
    assert row == {
        "chargeId": "ch_1",
        "entryKey": "cre_1",
        "id": "cre_1",
        "state": state,
        "amount": "27.01",
        "failureCode": None,
        "failureMessage": None,
    }


def test_id_less_entry_alone_is_keyed_by_created_time_and_amount() -> None:
    (row,) = summary([_order_with_entry("pending", at(300))])["chargeRefunds"]
    assert row["entryKey"] == f"{ENTRY_CREATED}|27.01"
    assert row["state"] == "pending"


def test_entry_with_other_amount_is_not_matched() -> None:
    other = event(
        "order.charge.refund.complete",
        order_obj(charges=[charge_obj([entry("complete", ENTRY_CREATED, 27.02)])]),
        at(9000),
    )
    final = run_every_order([_CHARGE_PENDING, other])
    assert len(final.charge_refunds) == 2


def test_id_less_entry_matching_two_entries_with_ids_converges() -> None:
    # Two entries of one charge share createdTime and amount (ids cre_X, cre_Y); an Order
    # snapshot shows one of them without id. Which entry it updates is ambiguous, but the
    # contract still requires the same rows whatever the order of arrival.
    x = event(
        "order.charge.refund.pending",
        charge_obj([entry("pending", ENTRY_CREATED, 5.0, "cre_X")]),
        at(300),
    )
    y = event(
        "order.charge.refund.pending",
        charge_obj([entry("pending", ENTRY_CREATED, 5.0, "cre_Y")]),
        at(400),
    )
    id_less = event(
        "order.charge.refund.complete",
        order_obj(total=None, charges=[charge_obj([entry("complete", ENTRY_CREATED, 5.0)])]),
        at(500),
    )
    final = run_every_order([x, y, id_less])
    assert set(final.charge_refunds) == {
        ("ch_1", "cre_X"),
        ("ch_1", "cre_Y"),
        ("ch_1", f"{ENTRY_CREATED}|5.00"),
    }
    # Ambiguous: the id-less sighting is shown on its own rather than guessed into one.
    assert [(e["entryKey"], e["state"]) for e in summarize(final)["chargeRefunds"]] == [
        (f"{ENTRY_CREATED}|5.00", "complete"),
        ("cre_X", "pending"),
        ("cre_Y", "pending"),
    ]


@pytest.mark.parametrize(
    ("older", "newer", "winner"),
    [
        pytest.param("pending_information", "pending", "pending", id="pi-then-pending"),
        pytest.param("pending", "pending_information", "pending", id="late-pi-loses"),
        pytest.param("complete", "pending", "complete", id="late-pending-loses"),
        pytest.param("complete", "failed", "failed", id="final-newer-wins"),
        pytest.param("failed", "complete", "complete", id="final-newer-wins-complete"),
    ],
)
def test_charge_refund_entry_rank(older: str, newer: str, winner: str) -> None:
    def ev(state: str, when: str) -> dict[str, Any]:
        type_ = "pending" if state == "pending_information" else state
        return event(
            f"order.charge.refund.{type_}",
            charge_obj([entry(state, ENTRY_CREATED, 27.01, "cre_1")]),
            when,
        )

    final = run_every_order([ev(older, at(300)), ev(newer, at(900))])
    (row,) = summarize(final)["chargeRefunds"]
    assert row["state"] == winner


# --- chargebacks --------------------------------------------------------------------------------


def test_chargeback_never_reverts() -> None:
    chargeback = event("order.chargeback", order_obj(refunded=0.0, available=0.0), at(100))
    later = [
        refund_event("pending", at(200), refund_id="re_new", amount=5.0),
        event("order.refunded", order_obj(refunded=0.0, available=54.02), at(300)),
        refund_event("failed", at(400), refund_id="re_new", amount=5.0, failure_reason="x"),
        event("sales_transaction.created", sale_obj("sale"), at(500)),
    ]
    state = run([chargeback])
    for env in later:
        state = run([env], state)
        out = summarize(state)
        assert out["chargebackStatus"] == "charged_back"
        assert out["refundStatus"] == "charged_back"
    assert state == run_every_order([chargeback, *later])


def test_earliest_chargeback_event_is_kept_in_any_order() -> None:
    first = event("order.chargeback", order_obj(), at(100), event_id="evt-cb-1")
    second = event("order.chargeback", order_obj(), at(200), event_id="evt-cb-2")
    final = run_every_order([first, second])
    assert final.chargeback_event is not None
    assert final.chargeback_event.id == "evt-cb-1"
    kept = step(run([first]), second).state.chargeback_event
    assert kept is not None
    assert kept.id == "evt-cb-1"


@pytest.mark.parametrize(
    ("sales", "amount", "count"),
    [
        pytest.param([("st_1", "fraud_chargeback", 27.01)], "27.01", 1, id="fraud"),
        pytest.param([("st_1", "non_fraud_chargeback", -27.01)], "27.01", 1, id="negative-sign"),
        pytest.param(
            [("st_1", "fraud_chargeback", 27.01), ("st_2", "non_fraud_chargeback", -5.0)],
            "32.01",
            2,
            id="two-chargebacks-sum-absolute",
        ),
        pytest.param(
            [("st_1", "fraud_chargeback", 27.01), ("st_1", "fraud_chargeback", 27.01)],
            "27.01",
            1,
            id="same-transaction-twice",
        ),
        pytest.param(
            [("st_1", "fraud_chargeback", 27.01), ("st_2", "sale", 27.01)],
            "27.01",
            1,
            id="sale-transaction-does-not-count",
        ),
    ],
)
def test_chargeback_sales_transactions(
    sales: list[tuple[str, str, float]], amount: str, count: int
) -> None:
    events = [
        event("sales_transaction.created", sale_obj(t, a, sale_id=i), at(n))
        for n, (i, t, a) in enumerate(sales)
    ]
    out = summarize(run_every_order(events))
    assert out["chargebackAmount"] == amount
    assert len(out["chargebacks"]) == count
    # Contract v2: a chargeback sales transaction charges the order back on its own (v1 said
    # `none` next to a non-zero chargebackAmount); with no order total known, all of it.
    assert out["chargebackStatus"] == "charged_back"


def test_order_chargeback_carrying_a_sales_transaction() -> None:
    out = summary([event("order.chargeback", sale_obj("non_fraud_chargeback", -10.0), at(0))])
    assert out["chargebackStatus"] == "charged_back"
    assert out["refundStatus"] == "charged_back"
    assert out["chargebacks"] == [{"id": "st_1", "type": "non_fraud_chargeback", "amount": "10.00"}]


# --- refundStatus and drRefundedAmount ------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "status"),
    [
        pytest.param([], "none", id="none-without-events"),
        # Contract v2: a chargeback sales transaction alone charges the order back (v1: none).
        pytest.param(
            [event("sales_transaction.created", sale_obj(), at(0))],
            "charged_back",
            id="charged-back-by-a-chargeback-sale",
        ),
        # Contract v2: a complete charge refund entry is refunded money (v1: none).
        pytest.param([_CHARGE_COMPLETE], "partially_refunded", id="refunded-by-a-charge-entry"),
        pytest.param(
            [event("order.refunded", order_obj(refunded=0.0, available=54.02), at(0))],
            "none",
            id="none-with-zero-figures",
        ),
        pytest.param(
            [event("order.chargeback", order_obj(), at(0))],
            "charged_back",
            id="charged-back",
        ),
        pytest.param(
            [
                refund_event("succeeded", at(0), amount=54.02, refunded=54.02),
                event("order.chargeback", order_obj(available=0.0), at(10)),
            ],
            "charged_back",
            id="charged-back-beats-refunded",
        ),
        pytest.param(
            [
                refund_event("succeeded", at(0)),
                event("order.refunded", order_obj(total=None, available=0.0), at(10)),
            ],
            "refunded",
            id="refunded-nothing-left-to-refund",
        ),
        pytest.param(
            [
                refund_event("succeeded", at(0), amount=54.02, refunded=54.02),
                event("order.refunded", order_obj(total=54.02), at(10)),
            ],
            "refunded",
            id="refunded-total-covered",
        ),
        pytest.param(
            [
                refund_event("succeeded", at(0), amount=27.01, refunded=27.01),
                event("order.refunded", order_obj(refunded=54.02, total=54.02), at(10)),
            ],
            "refunded",
            id="refunded-total-covered-by-dr-figure",
        ),
        pytest.param(
            [
                refund_event("succeeded", at(0)),
                event("order.refunded", order_obj(refunded=27.01, available=27.01), at(10)),
            ],
            "partially_refunded",
            id="partially-refunded",
        ),
        pytest.param(
            [refund_event("succeeded", at(0))],
            "partially_refunded",
            id="partially-refunded-without-order-figures",
        ),
        pytest.param(
            [event("order.refunded", order_obj(refunded=10.0, available=44.02), at(0))],
            "partially_refunded",
            id="partially-refunded-by-dr-figure-only",
        ),
        pytest.param(
            [
                refund_event("succeeded", at(0), refund_id="re_A"),
                refund_event("pending", at(5), refund_id="re_B", amount=5.0),
            ],
            "partially_refunded",
            id="partially-refunded-beats-pending",
        ),
        pytest.param([refund_event("pending", at(0))], "pending", id="pending"),
        pytest.param(
            [refund_event("pending_information", at(0))],
            "pending",
            id="pending-information-is-pending",
        ),
        pytest.param(
            [
                refund_event("failed", at(0), refund_id="re_A"),
                refund_event("pending", at(5), refund_id="re_B"),
            ],
            "pending",
            id="pending-beats-failed",
        ),
        pytest.param([refund_event("failed", at(0))], "failed", id="failed"),
        pytest.param(
            [
                refund_event("failed", at(0), refund_id="re_A"),
                refund_event("expired", at(5), refund_id="re_B"),
            ],
            "failed",
            id="failed-and-expired",
        ),
        pytest.param([refund_event("expired", at(0))], "failed", id="expired-only"),
    ],
)
def test_refund_status_rules(events: list[dict[str, Any]], status: str) -> None:
    out = summary(events)
    assert out["refundStatus"] == status
    assert out["chargebackStatus"] == ("charged_back" if status == "charged_back" else "none")


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([], None, id="no-order-event"),
        pytest.param([refund_event("succeeded", at(0))], None, id="refund-events-carry-no-order"),
        pytest.param(
            [event("order.refunded", order_obj(refunded=10.0), at(0))], "10.00", id="one-figure"
        ),
        pytest.param(
            [
                event("order.refunded", order_obj(refunded=10.0), at(0)),
                event("order.chargeback", order_obj(refunded=27.01), at(10)),
            ],
            "27.01",
            id="newest-chargeback-wins",
        ),
        pytest.param(
            [
                event("order.chargeback", order_obj(refunded=27.01), at(0)),
                event("order.refunded", order_obj(refunded=10.0), at(10)),
            ],
            "10.00",
            id="newest-wins-even-if-smaller",
        ),
        pytest.param(
            [
                event("order.refunded", order_obj(refunded=10.0), at(0)),
                event("order.refunded", order_obj(refunded=None, available=0.0), at(10)),
            ],
            "10.00",
            id="newest-without-the-field-keeps-older",
        ),
        pytest.param(
            [
                event("order.refunded", order_obj(refunded=10.0), at(0)),
                event(
                    "order.charge.refund.complete",
                    order_obj(refunded=27.01, charges=[charge_obj([])]),
                    at(10),
                ),
            ],
            "27.01",
            id="charge-event-carrying-an-order",
        ),
        pytest.param(
            [
                event("order.refunded", order_obj(refunded=27.01), at(10), event_id="evt-a"),
                event("order.refunded", order_obj(refunded=5.0), at(10), event_id="evt-b"),
            ],
            "5.00",
            id="same-time-greater-id-wins",
        ),
    ],
)
def test_dr_refunded_amount_comes_from_the_newest_order_event(
    events: list[dict[str, Any]], expected: str | None
) -> None:
    assert summarize(run_every_order(events))["drRefundedAmount"] == expected


# --- the example story (digital-river-events.md section 9) ------------------------------------

STORY_SUMMARY: dict[str, Any] = {
    "orderId": "241500010336",
    "upstreamId": None,
    "currency": "USD",
    "orderState": "complete",
    "totalAmount": "54.02",
    "capturedAmount": "54.02",
    "availableToRefundAmount": "0.00",
    "refundStatus": "charged_back",
    "refundedAmount": "27.01",
    "pendingRefundAmount": "0.00",
    "drRefundedAmount": "27.01",
    "chargebackStatus": "charged_back",
    "chargebackAmount": "27.01",
    "disputeStatus": "none",
    "refunds": [
        {
            "id": "re_7f1c2b3a-9d84-4e1f-b2a6-3c5d7e9f0a12",
            "type": None,
            "state": "succeeded",
            "amount": "27.01",
            "refundedAmount": "27.01",
            "reason": "requested_by_customer",
            "failureReason": None,
            "items": [
                {
                    "itemId": "170000010336",
                    "skuId": "sku_tee_blue",
                    "quantity": 1,
                    "amount": "27.01",
                    "refundedAmount": "27.01",
                    "percent": None,
                    "type": None,
                }
            ],
            "metadata": {},
            "expiresTime": None,
            "tokenInformation": None,
            "createdTime": "2024-05-14T10:02:10Z",
            "lastEventId": "0c1e5a7e-3b5d-4a51-9a0e-5f3f2d7c9a12",
            "lastEventTime": "2024-05-14T18:21:09.004417Z",
        },
        {
            "id": "re_3d9a8c7b-2e1f-4a0b-9c8d-7e6f5a4b3c14",
            "type": None,
            "state": "failed",
            "amount": "5.00",
            "refundedAmount": "0.00",
            "reason": "goodwill",
            "failureReason": "expired_or_canceled_card",
            "items": [],
            "metadata": {},
            "expiresTime": None,
            "tokenInformation": None,
            "createdTime": "2024-05-20T08:00:00Z",
            "lastEventId": "0c1e5a7e-3b5d-4a51-9a0e-5f3f2d7c9a13",
            "lastEventTime": "2024-05-20T09:15:44.310562Z",
        },
    ],
    "chargeRefunds": [
        {
            "chargeId": "c1a4e7d2-5b1f-4c8e-9a70-2f3d6b8e1a01",
            "entryKey": "9b0e4c6d-1f2a-4b3c-8d4e-5f6a7b8c9d03",
            "id": "9b0e4c6d-1f2a-4b3c-8d4e-5f6a7b8c9d03",
            "state": "complete",
            "amount": "27.01",
            "failureCode": None,
            "failureMessage": None,
        }
    ],
    "chargebacks": [
        {"id": "0241500010_000020_3700009921", "type": "fraud_chargeback", "amount": "27.01"}
    ],
    "lastEventId": "9d8c7b6a-5f4e-4d3c-9b2a-1f0e9d8c7b16",
    "lastEventTime": "2024-06-10T04:10:06.402981Z",
}


def test_fixtures_are_the_documented_events() -> None:
    envs = [load_fixture(name) for name in STORY]
    assert [e.type for e in envs] == [
        "refund.pending",
        "order.charge.refund.pending",
        "order.charge.refund.complete",
        "refund.complete",
        "order.refunded",
        "refund.failed",
        "sales_transaction.created",
        "order.chargeback",
    ]
    assert len({e.id for e in envs}) == len(envs)
    assert [ref(e) for e in envs] == sorted(ref(e) for e in envs)
    assert all(e.liveMode is False for e in envs)
    assert all(e.digitalriverVersion == "2021-12-13" for e in envs)
    # Numbers are kept as written in the doc.
    assert (FIXTURES / "05_order_refunded.json").read_text().count('"cancelledAmount":0.0') == 1


def test_example_story_step_by_step() -> None:
    state = OrderState(ORDER_ID)
    statuses: list[str] = []
    for name in STORY:
        decision = step(state, load_fixture(name))
        assert decision.outcome is Outcome.APPLIED, name
        state = decision.state
        statuses.append(summarize(state)["refundStatus"])
    assert statuses == [
        "pending",
        "pending",
        # Contract v2: the complete charge refund entry is refunded money (v1: pending).
        "partially_refunded",
        "partially_refunded",
        "partially_refunded",
        "partially_refunded",
        # Contract v2: the chargeback sale of 27.01 takes all that the refunds left of the
        # 54.02 captured (v1 waited for order.chargeback).
        "charged_back",
        "charged_back",
    ]
    assert summarize(state, updated_at=None) == {**STORY_SUMMARY, "updatedAt": None, "version": 8}


@pytest.mark.parametrize("seed", range(12))
def test_example_story_in_any_order_with_duplicates(seed: int) -> None:
    rng = random.Random(seed)
    envs = [load_fixture(name) for name in STORY]
    arrival = envs + rng.sample(envs, k=rng.randint(0, 4))
    rng.shuffle(arrival)
    assert comparable(summarize(run(arrival), updated_at=None)) == STORY_SUMMARY


def test_example_story_reversed() -> None:
    envs = [load_fixture(name) for name in reversed(STORY)]
    assert comparable(summarize(run(envs))) == STORY_SUMMARY


def test_non_chargeback_sales_transaction_is_ignored_before_validation() -> None:
    envelope = Envelope.model_validate(
        {
            "id": "evt-sale",
            "type": "sales_transaction.created",
            "createdTime": "2024-05-14T10:00:00Z",
            "data": {"object": {"id": "st_1", "type": "sale"}},
        }
    )
    plan = interpret(envelope, "any")
    assert isinstance(plan, Ignore)
    assert "sale" in plan.reason

"""The convergence rule as a property: stored state is a function of the set of events.

Hypothesis builds the events of one order's life (refunds in random states and times,
charge refund entries seen with and without ids, in Charges and in Orders, DR order
figures, chargebacks, sales transactions), then delivers them in a random order with
random duplicates. The final state and summary must equal those of the canonical order.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from models.payloads import Envelope, as_utc, load_json
from models.rules import EventRef, Ignore, OrderState, apply, interpret
from models.summary import summarize

ORDER_ID = "241500010336"
CURRENCY = "USD"
T0 = datetime(2024, 5, 14, 10, 0, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))

REFUND_STATES = ["pending_information", "pending", "succeeded", "failed", "expired"]
REFUND_TYPES = [
    "refund.pending_information",
    "refund.pending",
    "refund.complete",
    "refund.failed",
    "refund.updated",
]
ENTRY_STATES = ["pending_information", "pending", "complete", "failed"]
CHARGE_TYPES = [
    "order.charge.refund.pending",
    "order.charge.refund.complete",
    "order.charge.refund.failed",
]
AMOUNTS = [5.0, 27.01, 53.769999999999996]

Event = dict[str, Any]


def _text(instant: datetime, style: int) -> str:
    """One instant in one of the ways DR (or a proxy) could write it."""
    if style == 0:
        return instant.isoformat().replace("+00:00", "Z")
    if style == 1:
        return instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return instant.astimezone(PLUS_TWO).isoformat()


@st.composite
def event_times(draw: st.DrawFn) -> str:
    # Few distinct instants, so that equal createdTimes (decided by id) are common.
    seconds = draw(st.integers(min_value=0, max_value=8))
    micros = draw(st.sampled_from([0, 0, 500_000, 123_456]))
    return _text(T0 + timedelta(seconds=seconds, microseconds=micros), draw(st.integers(0, 2)))


@st.composite
def refund_events(draw: st.DrawFn, refund_id: str) -> list[tuple[str, dict[str, Any], str]]:
    created = _text(T0 - timedelta(minutes=draw(st.integers(1, 30))), 0)
    item_level = draw(st.booleans())
    amount = draw(st.sampled_from(AMOUNTS))
    items = draw(st.lists(st.sampled_from(AMOUNTS), min_size=1, max_size=2))
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        state = draw(st.sampled_from(REFUND_STATES))
        obj: dict[str, Any] = {
            "id": refund_id,
            "orderId": ORDER_ID,
            "currency": CURRENCY,
            "createdTime": created,
            "state": state,
            "reason": draw(st.sampled_from(["requested_by_customer", "goodwill"])),
            "liveMode": False,
        }
        if item_level:
            obj["items"] = [
                {"itemId": f"it{n}", "quantity": 1, "amount": a, "refundedAmount": 0.0}
                for n, a in enumerate(items)
            ]
        else:
            obj["amount"] = amount
        if state == "succeeded":
            if draw(st.booleans()):
                obj["refundedAmount"] = sum(items) if item_level else amount
        else:
            obj["refundedAmount"] = 0.0
        if state == "failed" and draw(st.booleans()):
            obj["failureReason"] = "expired_or_canceled_card"
        # The fields v2 keeps, differing between sightings of the same refund.
        if draw(st.booleans()):
            obj["type"] = draw(st.sampled_from(["shipping", "tax"]))
        if draw(st.booleans()):
            obj["metadata"] = {"note": draw(st.sampled_from(["a", "b"])), "n": 1.5}
        if state == "pending_information" and draw(st.booleans()):
            obj["tokenInformation"] = {"token": "tok", "expiresTime": "2024-06-14T10:00:00Z"}
            obj["expiresTime"] = "2024-06-14T10:00:00Z"
        # The type need not match the state: the state is read from the object.
        type_ = draw(st.sampled_from(REFUND_TYPES))
        out.append((type_, obj, draw(event_times())))
    return out


@st.composite
def charge_entities(draw: st.DrawFn, charge_id: str) -> list[tuple[str, datetime, float]]:
    """A charge's refund entries: (id, createdTime, amount), distinct (createdTime, amount)."""
    count = draw(st.integers(min_value=1, max_value=3))
    offsets = draw(st.lists(st.integers(min_value=0, max_value=3), min_size=count, max_size=count))
    amounts = draw(st.lists(st.sampled_from(AMOUNTS[:2]), min_size=count, max_size=count))
    entities: dict[tuple[datetime, float], tuple[str, datetime, float]] = {}
    for n, (offset, amount) in enumerate(zip(offsets, amounts, strict=True)):
        created = T0 - timedelta(minutes=10 - offset)
        entities.setdefault((created, amount), (f"{charge_id}-re-{n}", created, amount))
    return list(entities.values())


def _figures(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": ORDER_ID, "currency": CURRENCY}
    for name in ("state", "upstreamId"):
        word = draw(st.one_of(st.none(), st.sampled_from(["complete", "dispute", "returned"])))
        if word is not None:
            obj[name] = word
    for name in ("totalAmount", "capturedAmount", "refundedAmount", "availableToRefundAmount"):
        amount = draw(st.one_of(st.none(), st.sampled_from([0.0, 27.01, 54.02])))
        if amount is not None:
            obj[name] = amount
    return obj


@st.composite
def order_lives(draw: st.DrawFn) -> list[Envelope]:
    """The distinct events of one order's life, each with its own event id."""
    raw: list[tuple[str, dict[str, Any], str]] = []
    for n in range(draw(st.integers(min_value=1, max_value=3))):
        raw += draw(refund_events(f"re_{n}"))

    charges = {
        f"ch{c}": draw(charge_entities(f"ch{c}"))
        for c in range(draw(st.integers(min_value=0, max_value=2)))
    }

    def observe(entity: tuple[str, datetime, float]) -> dict[str, Any]:
        entry_id, created, amount = entity
        seen: dict[str, Any] = {
            # Each sighting may write the entry's createdTime its own way.
            "createdTime": _text(created, draw(st.integers(0, 2))),
            "amount": amount,
            "state": draw(st.sampled_from(ENTRY_STATES)),
        }
        if seen["state"] == "failed" and draw(st.booleans()):
            seen["failureCode"] = "declined"
        if draw(st.booleans()):
            seen["id"] = entry_id
        return seen

    def charge(charge_id: str, entities: list[tuple[str, datetime, float]]) -> dict[str, Any]:
        shown = draw(st.lists(st.sampled_from(entities), min_size=1, unique=True))
        return {
            "id": charge_id,
            "orderId": ORDER_ID,
            "currency": CURRENCY,
            "amount": 54.02,
            "state": "complete",
            "refunded": True,
            "refunds": [observe(e) for e in shown],
        }

    if charges:
        for _ in range(draw(st.integers(min_value=0, max_value=4))):
            type_ = draw(st.sampled_from(CHARGE_TYPES))
            if draw(st.booleans()):
                charge_id = draw(st.sampled_from(sorted(charges)))
                raw.append((type_, charge(charge_id, charges[charge_id]), draw(event_times())))
            else:
                order = _figures(draw)
                order["payment"] = {"charges": [charge(c, e) for c, e in charges.items()]}
                raw.append((type_, order, draw(event_times())))

    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        raw.append(("order.refunded", _figures(draw), draw(event_times())))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        raw.append(("order.chargeback", _figures(draw), draw(event_times())))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        type_ = draw(st.sampled_from(["order.dispute", "order.dispute.resolved"]))
        raw.append((type_, _figures(draw), draw(event_times())))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        sale = {
            "id": draw(st.sampled_from(["st_1", "st_2"])),
            "type": draw(st.sampled_from(["fraud_chargeback", "non_fraud_chargeback", "sale"])),
            "orderId": ORDER_ID,
            "currency": CURRENCY,
            "amount": draw(st.sampled_from([27.01, -27.01, 5.0])),
            "liveMode": False,
        }
        raw.append(("sales_transaction.created", sale, draw(event_times())))

    ids = draw(
        st.lists(
            st.text(alphabet="0123456789abcdef", min_size=3, max_size=3),
            min_size=len(raw),
            max_size=len(raw),
            unique=True,
        )
    )
    return [
        Envelope.model_validate(
            load_json(
                json.dumps(
                    {
                        "id": event_id,
                        "type": type_,
                        "data": {"object": obj},
                        "liveMode": False,
                        "createdTime": when,
                    }
                )
            )
        )
        for event_id, (type_, obj, when) in zip(ids, raw, strict=True)
    ]


def ref(env: Envelope) -> EventRef:
    return EventRef(as_utc(env.createdTime), env.id)


def sightings(events: list[Envelope]) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
    """The stored keys (one per sighting key: the entry id, else `createdTime|amount`) and,
    per shown entry, its key (its id if any event showed one). Entities are generated with
    distinct createdTime and amount, so id-less sightings are never ambiguous."""
    stored: set[tuple[str, str]] = set()
    ids: dict[tuple[str, datetime, Decimal], set[str]] = {}
    for env in events:
        obj = env.data.object
        if not env.type.startswith("order.charge.refund."):
            continue
        charges = obj["payment"]["charges"] if "payment" in obj else [obj]
        for charge in charges:
            for entry in charge["refunds"]:
                created = as_utc(datetime.fromisoformat(entry["createdTime"]))
                amount = Decimal(entry["amount"]).quantize(Decimal("0.01"))
                seen = ids.setdefault((charge["id"], created, amount), set())
                if "id" in entry:
                    seen.add(entry["id"])
                    stored.add((charge["id"], entry["id"]))
                else:
                    stored.add(
                        (charge["id"], f"{created.isoformat().replace('+00:00', 'Z')}|{amount}")
                    )
    shown: dict[tuple[str, str], str] = {}
    for (charge_id, created, amount), seen in ids.items():
        assert len(seen) <= 1
        key = seen.pop() if seen else f"{created.isoformat().replace('+00:00', 'Z')}|{amount}"
        shown[(charge_id, key)] = key
    return stored, shown


def _unversioned(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in summary.items() if key != "version"}


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_duplicates_never_add_a_version(data: st.DataObject) -> None:
    events = data.draw(order_lives(), label="events")
    arrival = data.draw(st.permutations(events), label="arrival")
    # Each duplicate arrives somewhere after its first copy.
    delivered = list(arrival)
    for event in data.draw(st.lists(st.sampled_from(events), max_size=6), label="duplicates"):
        first = delivered.index(event)
        delivered.insert(data.draw(st.integers(first + 1, len(delivered)), label="at"), event)

    assert run(delivered).version == run(arrival).version
    # And every version is one event that changed something: never more than the events.
    assert run(arrival).version <= len(events)


def run(events: list[Envelope]) -> OrderState:
    state = OrderState(ORDER_ID)
    for env in events:
        plan = interpret(env, "any")
        if isinstance(plan, Ignore):
            continue
        state = apply(state, ref(env), plan).state
    return state


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_state_is_a_function_of_the_set_of_events(data: st.DataObject) -> None:
    events = data.draw(order_lives(), label="events")
    duplicates = data.draw(st.lists(st.sampled_from(events), max_size=6), label="duplicates")
    arrival = data.draw(st.permutations(events + duplicates), label="arrival")

    canonical = run(sorted(events, key=ref))
    state = run(arrival)

    # `version` counts the events that changed the state, which depends on their order
    # (an older event that arrives late is stale): all else is a function of the set.
    assert _unversioned(summarize(state, updated_at=None)) == _unversioned(
        summarize(canonical, updated_at=None)
    )
    assert replace(state, version=0) == replace(canonical, version=0)
    # And the rows themselves are right: one per sighting key, and the summary shows one
    # entry per charge refund entry, id-less sightings folded into the entry with the id.
    stored, shown = sightings(events)
    assert set(state.charge_refunds) == stored
    entries = summarize(state, updated_at=None)["chargeRefunds"]
    assert {(e["chargeId"], e["entryKey"]) for e in entries} == set(shown)
    assert len(entries) == len(shown)

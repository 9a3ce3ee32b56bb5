"""Hostile inputs, end to end: through the real HTTP endpoint and the real Celery workers.

The rule for every case in CORPUS: either the ingest answers a clear 4xx with a JSON
`{"error", "message"}` body and nothing is queued for it, or it answers 202 and the event
ends `failed` (a non-empty reason stored, readable via GET /events/{id}) or `ignored`
(unhandled type, as the contract says). Meanwhile no row of another order changes (a
"bystander" order, which many cases try to touch, is snapshotted before and compared
after), no worker crashes, and afterwards the service is up and applies a valid event.

The whole corpus is sent first and waited for once (the `run` fixture); each case is then
checked on its own. Every id that a case introduces carries a marker `hx<16 hex>`, so the
rows a case might have left behind can be found whatever the id looks like.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pytest
from _pytest.mark import ParameterSet
from sqlalchemy import text

from tests import deadlines, support
from tests.support import Stack

# --- building blocks ---------------------------------------------------------------------

# Later than every bystander event, so a hostile event that slipped through would win.
CORPUS_TIME = "2024-06-01T00:00:00Z"
RAW = "<<raw>>"  # a hole in a body, filled with literal JSON text by spliced()
MARKER = re.compile(rb"hx[0-9a-f]{16}")

Send = Literal[
    "signed",
    "unsigned",
    "wrong-secret",
    "stale",
    "future",
    "tampered",
    "garbage-signature",
    "text/plain",
]


def _key() -> str:
    return f"hx{uuid.uuid4().hex[:16]}"


def envelope(kind: str, obj: Any, **top: Any) -> dict[str, Any]:
    """A DR event of type `kind` around `obj`; `top` overrides envelope fields."""
    event: dict[str, Any] = {
        "id": f"evt-{_key()}",
        "type": kind,
        "createdTime": CORPUS_TIME,
        "liveMode": False,
        "data": {"object": obj},
    }
    event.update(top)
    return event


def refund_obj(**fields: Any) -> dict[str, Any]:
    """A valid succeeded USD Refund for an order of its own; `fields` override."""
    key = _key()
    obj: dict[str, Any] = {
        "id": f"re_{key}",
        "orderId": f"ord-{key}",
        "currency": "USD",
        "amount": 10.0,
        "refundedAmount": 10.0,
        "state": "succeeded",
        "reason": "requested_by_customer",
        "createdTime": CORPUS_TIME,
    }
    obj.update(fields)
    return obj


def refund_event(kind: str = "refund.complete", **fields: Any) -> dict[str, Any]:
    return envelope(kind, refund_obj(**fields))


def spliced(body: dict[str, Any], literal: str | bytes) -> bytes:
    """`body` as JSON with the hole RAW (a string value, or a whole `"<<raw>>": 0` member)
    replaced by `literal`, for what json.dumps cannot write: NaN, 1e400, bad UTF-8..."""
    raw = json.dumps(body).encode()
    fill = literal.encode() if isinstance(literal, str) else literal
    for hole in (f'"{RAW}": 0'.encode(), f'"{RAW}"'.encode()):
        if hole in raw:
            return raw.replace(hole, fill, 1)
    raise AssertionError("spliced() needs a body with a RAW hole")


def nested(depth: int, *, objects: bool = False) -> str:
    if objects:
        return '{"a":' * depth + "1" + "}" * depth
    return "[" * depth + "]" * depth


# --- the bystander: an order with rows in every table, which cases aim at ---------------

# Its ids carry no marker: the rows of the bystander are compared, not searched for.
_by = uuid.uuid4().hex[:12]
BYSTANDER = f"bystander-{_by}"
BY_DONE = f"re_done_{_by}"  # succeeded refund
BY_PENDING = f"re_pending_{_by}"  # pending refund: hostile events try to complete it
BY_CHARGE = f"ch_{_by}"
BY_ENTRY = f"chre_{_by}"
BY_SALE = f"st_{_by}"


def _at(minute: int) -> str:
    return f"2024-05-14T10:{minute:02d}:00Z"


BYSTANDER_SETUP: list[dict[str, Any]] = [
    envelope(
        "refund.complete",
        refund_obj(id=BY_DONE, orderId=BYSTANDER, createdTime=_at(0)),
        createdTime=_at(1),
    ),
    envelope(
        "refund.pending",
        refund_obj(
            id=BY_PENDING,
            orderId=BYSTANDER,
            state="pending",
            amount=5.0,
            refundedAmount=0.0,
            createdTime=_at(2),
        ),
        createdTime=_at(3),
    ),
    envelope(
        "order.charge.refund.pending",
        {
            "id": BY_CHARGE,
            "orderId": BYSTANDER,
            "currency": "USD",
            "refunds": [
                {"id": BY_ENTRY, "createdTime": _at(4), "amount": 10.0, "state": "pending"}
            ],
        },
        createdTime=_at(5),
    ),
    envelope(
        "sales_transaction.created",
        {
            "id": BY_SALE,
            "type": "fraud_chargeback",
            "orderId": BYSTANDER,
            "currency": "USD",
            "amount": 3.0,
        },
        createdTime=_at(6),
    ),
    envelope(
        "order.refunded",
        {
            "id": BYSTANDER,
            "currency": "USD",
            "totalAmount": 100.0,
            "refundedAmount": 10.0,
            "availableToRefundAmount": 90.0,
        },
        createdTime=_at(7),
    ),
]


def bystander_refund(**fields: Any) -> dict[str, Any]:
    """refund.complete for the bystander's pending refund: valid unless `fields` break it.
    Applied, it would turn the pending refund into a succeeded one."""
    return refund_event(id=BY_PENDING, orderId=BYSTANDER, **fields)


def bystander_charge(*entries: dict[str, Any], **fields: Any) -> dict[str, Any]:
    charge = {"id": BY_CHARGE, "orderId": BYSTANDER, "currency": "USD", "refunds": list(entries)}
    charge.update(fields)
    return envelope("order.charge.refund.complete", charge)


def bystander_sale(**fields: Any) -> dict[str, Any]:
    sale = {
        "id": f"st_{_key()}",
        "type": "fraud_chargeback",
        "orderId": BYSTANDER,
        "currency": "USD",
        "amount": 7.0,
    }
    sale.update(fields)
    return envelope("sales_transaction.created", sale)


def bystander_order(kind: str = "order.refunded", **fields: Any) -> dict[str, Any]:
    order = {
        "id": BYSTANDER,
        "currency": "USD",
        "totalAmount": 100.0,
        "refundedAmount": 100.0,
        "availableToRefundAmount": 0.0,
    }
    order.update(fields)
    return envelope(kind, order)


# Events whose id a corpus case reuses. They are sent and finished during setup so that
# the corpus copy is certainly the second one.
REUSED_FOR_OTHER_TYPE = envelope("order.accepted", {"id": f"ord-{_key()}"})
REPLAYED_AFTER_FAILING = refund_event(amount=-1.0)
FIRST_COPIES = [REUSED_FOR_OTHER_TYPE, REPLAYED_AFTER_FAILING]


# --- the corpus ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile input and how it must end: an HTTP code ("400", "401"...) for a refusal
    at the ingest, else the final outcome ("failed" or "ignored")."""

    name: str
    body: bytes | dict[str, Any]
    expected: str
    reason: str | None = None  # text the stored error must contain
    send: Send = "signed"
    event_id: str | None = None  # the id it is recorded under, where body["id"] is not it

    @property
    def raw(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()

    @property
    def accepted(self) -> bool:
        return self.expected in ("failed", "ignored")

    @property
    def recorded_as(self) -> str | None:
        if self.event_id is not None:
            return self.event_id
        try:
            body = json.loads(self.raw) if isinstance(self.body, bytes) else self.body
        except ValueError:
            return None
        found = body.get("id") if isinstance(body, dict) else None
        return found if isinstance(found, str) else None

    @property
    def markers(self) -> list[str]:
        return sorted({m.decode() for m in MARKER.findall(self.raw)})


def hostile(name: str, body: bytes | dict[str, Any], expected: str, **options: Any) -> Case:
    return Case(name, body, expected, **options)


def id_of_length(length: int) -> str:
    start = f"evt-{_key()}"
    return start + "x" * (length - len(start))


_dup_first, _dup_last = f"evt-{_key()}", f"evt-{_key()}"
_own = refund_obj()

CASES: list[Case] = [
    # Signature and transport: the body is a valid event that would complete the
    # bystander's pending refund, so any of these getting through would show.
    hostile("no-signature", bystander_refund(), "401", send="unsigned"),
    hostile("signed-with-unknown-secret", bystander_refund(), "401", send="wrong-secret"),
    hostile("signature-an-hour-old", bystander_refund(), "401", send="stale"),
    hostile("signature-an-hour-ahead", bystander_refund(), "401", send="future"),
    hostile("signature-of-another-body", bystander_refund(), "401", send="tampered"),
    hostile("garbage-signature-header", bystander_refund(), "401", send="garbage-signature"),
    hostile("content-type-text-plain", bystander_refund(), "415", send="text/plain"),
    hostile("body-over-1mb", bystander_refund(reason="r" * 1_100_000), "413"),
    # Bodies the ingest must refuse as not JSON, or not an event.
    hostile("invalid-utf8", spliced(bystander_refund(reason=RAW), b'"\xff\xfe"'), "400"),
    hostile("overlong-utf8", spliced(bystander_refund(reason=RAW), b'"\xc0\xaf"'), "400"),
    hostile(
        "utf8-encoded-surrogate", spliced(bystander_refund(reason=RAW), b'"\xed\xa0\x80"'), "400"
    ),
    hostile("utf16-body", json.dumps(bystander_refund()).encode("utf-16"), "400"),
    hostile("utf8-bom", b"\xef\xbb\xbf" + json.dumps(bystander_refund()).encode(), "400"),
    hostile("empty-body", b"", "400"),
    hostile("json-null", b"null", "400"),
    hostile("json-string", b'"refund.complete"', "400"),
    hostile("json-number", b"42", "400"),
    hostile("json-array-of-an-event", json.dumps([bystander_refund()]).encode(), "400"),
    hostile("truncated-json", json.dumps(bystander_refund()).encode()[:-7], "400"),
    hostile("nested-10000-arrays-whole-body", nested(10_000).encode(), "400"),
    hostile("nested-10000-objects-whole-body", nested(10_000, objects=True).encode(), "400"),
    hostile(
        "nested-10000-in-data-object",
        spliced(envelope("refund.complete", RAW), nested(10_000)),
        "400",
    ),
    # Deep enough to pass the ingest's parser but not a worker's (less recursion headroom
    # in a Celery task): it used to be accepted and then vanish, unrecordable.
    hostile(
        "nested-960-in-data-object",
        spliced(envelope("refund.complete", RAW), nested(960)),
        "400",
    ),
    hostile("nan-literal-amount", spliced(bystander_refund(amount=RAW), "NaN"), "400"),
    hostile("infinity-literal-amount", spliced(bystander_refund(amount=RAW), "Infinity"), "400"),
    hostile("minus-infinity-literal", spliced(bystander_refund(amount=RAW), "-Infinity"), "400"),
    hostile("integer-of-5000-digits", spliced(bystander_refund(amount=RAW), "9" * 5000), "400"),
    hostile(
        "raw-nul-byte-in-a-string",
        spliced(bystander_refund(reason=RAW), b'"a\x00b"'),
        "400",
    ),
    hostile("event-id-number", {**bystander_refund(), "id": 12345}, "400"),
    hostile("event-id-null", {**bystander_refund(), "id": None}, "400"),
    hostile("event-id-list", {**bystander_refund(), "id": [_key()]}, "400"),
    hostile("event-id-object", {**bystander_refund(), "id": {"id": _key()}}, "400"),
    hostile("event-id-empty", {**bystander_refund(), "id": ""}, "400"),
    hostile("event-id-blank", {**bystander_refund(), "id": "   "}, "400"),
    hostile("event-id-256-chars", {**bystander_refund(), "id": id_of_length(256)}, "400"),
    hostile("event-id-100kb", {**bystander_refund(), "id": _key() + "x" * 100_000}, "400"),
    hostile(
        "event-type-missing", {k: v for k, v in bystander_refund().items() if k != "type"}, "400"
    ),
    hostile("event-type-100kb", {**bystander_refund(), "type": "refund." + "x" * 100_000}, "400"),
    # Strings Postgres cannot store as text: NUL used to be accepted then lost (no record),
    # a lone surrogate used to be queued and then answered 500.
    hostile("event-id-with-nul", {**bystander_refund(), "id": f"evt-{_key()}\x00"}, "400"),
    hostile("event-id-lone-surrogate", {**bystander_refund(), "id": f"evt-{_key()}\ud800"}, "400"),
    hostile("event-type-with-nul", {**bystander_refund(), "type": "refund.complete\x00"}, "400"),
    hostile("event-id-with-newline", {**bystander_refund(), "id": f"evt-{_key()}\nFAKE"}, "400"),
    # Accepted (an envelope with a string id and type), then refused by the worker.
    hostile("refund-id-number", refund_event(id=12345), "failed", reason="Refund.id"),
    hostile("refund-id-list", refund_event(id=["re_1"]), "failed", reason="Refund.id"),
    hostile("refund-id-object", refund_event(id={"id": "re_1"}), "failed", reason="Refund.id"),
    hostile("refund-id-null", refund_event(id=None), "failed", reason="Refund.id"),
    hostile(
        "refund-id-100kb", refund_event(id="re_" + "x" * 100_000), "failed", reason="Refund.id"
    ),
    hostile("refund-id-with-nul", refund_event(id=f"re_{_key()}\x00"), "failed", reason="refused"),
    hostile(
        "refund-id-lone-surrogate",
        refund_event(id=f"re_{_key()}\ud800"),
        "failed",
        reason="refused",
    ),
    hostile("order-id-number", refund_event(orderId=241500010336), "failed", reason="orderId"),
    hostile(
        "order-id-100kb", refund_event(orderId="o" * 100_000), "failed", reason="Refund.orderId"
    ),
    hostile("state-unknown", bystander_refund(state="refunded"), "failed", reason="Refund.state"),
    hostile("state-null", bystander_refund(state=None), "failed", reason="Refund.state"),
    hostile("currency-number", bystander_refund(currency=840), "failed", reason="currency"),
    hostile("currency-unknown-XXQ", refund_event(currency="XXQ"), "failed", reason="XXQ"),
    hostile("amount-string-ten", bystander_refund(amount="ten"), "failed", reason="amount"),
    hostile("amount-string-NaN", bystander_refund(amount="NaN"), "failed", reason="amount"),
    hostile("amount-negative", bystander_refund(amount=-10.0), "failed", reason="negative"),
    hostile("amount-1e15", bystander_refund(amount=1e15), "failed", reason="out of range"),
    hostile(
        "amount-1e400",
        spliced(bystander_refund(amount=RAW), "1e400"),
        "failed",
        reason="out of range",
    ),
    hostile(
        "amount-10-pow-30-integer",
        spliced(bystander_refund(amount=RAW), str(10**30)),
        "failed",
        reason="out of range",
    ),
    # Fine for Python's Decimal, beyond Postgres's numeric: the raw payload is unstorable.
    hostile(
        "amount-1e-1000000",
        spliced(bystander_refund(amount=RAW), "1e-1000000"),
        "failed",
        reason="refused",
    ),
    hostile(
        "refunded-amount-list",
        bystander_refund(refundedAmount=[10]),
        "failed",
        reason="refundedAmount",
    ),
    hostile("items-a-string", bystander_refund(items="all"), "failed", reason="Refund.items"),
    hostile("items-an-object", bystander_refund(items={"0": {}}), "failed", reason="Refund.items"),
    hostile(
        "item-amount-ten",
        bystander_refund(items=[{"amount": "ten"}]),
        "failed",
        reason="Refund.items",
    ),
    # Each item in range, their sum (the refund's amount) over 10^15.
    hostile(
        "item-amounts-sum-over-1e15",
        bystander_refund(amount=None, refundedAmount=None, items=[{"amount": 9e14}] * 2),
        "failed",
        reason="out of range",
    ),
    hostile("reason-100kb", bystander_refund(reason="r" * 100_000), "failed", reason="reason"),
    hostile("reason-with-nul", bystander_refund(reason="a\x00b"), "failed", reason="refused"),
    hostile(
        "failure-reason-number", bystander_refund(failureReason=42), "failed", reason="failure"
    ),
    hostile(
        "refund-created-time-garbage",
        bystander_refund(createdTime="yesterday"),
        "failed",
        reason="Refund.createdTime",
    ),
    hostile(
        "refund-created-time-naive",
        bystander_refund(createdTime="2024-06-01T00:00:00"),
        "failed",
        reason="Refund.createdTime",
    ),
    # Valid as written, past year 9999 once in UTC: used to crash the worker and leave the
    # event queued forever.
    hostile(
        "refund-created-time-beyond-9999-utc",
        bystander_refund(createdTime="9999-12-31T23:59:59-01:00"),
        "failed",
        reason="createdTime",
    ),
    hostile(
        "event-created-time-garbage",
        {**bystander_refund(), "createdTime": "2024-13-45T99:99:99Z"},
        "failed",
        reason="createdTime",
    ),
    hostile(
        "event-created-time-year-10000",
        {**bystander_refund(), "createdTime": "10000-01-01T00:00:00Z"},
        "failed",
        reason="createdTime",
    ),
    hostile(
        "event-created-time-beyond-9999-utc",
        {**bystander_refund(), "createdTime": "9999-12-31T23:59:59-01:00"},
        "failed",
        reason="createdTime",
    ),
    hostile(
        "live-mode-a-string",
        {**bystander_refund(), "liveMode": "false"},
        "failed",
        reason="liveMode",
    ),
    hostile(
        "refund-in-another-currency-than-its-order",
        bystander_refund(currency="EUR"),
        "failed",
        reason="EUR",
    ),
    hostile(
        "sql-in-event-refund-and-order-ids",
        envelope(
            "refund.complete",
            refund_obj(
                id=f"re_'; DROP TABLE refunds;-- {_key()}",
                orderId=f"'; DROP TABLE orders;-- {_key()}",
                state="refunded",
            ),
            id=f"evt-'; DROP TABLE webhook_events;-- {_key()}",
        ),
        "failed",
        reason="Refund.state",
    ),
    hostile(
        "shell-in-event-refund-and-order-ids",
        envelope(
            "refund.complete",
            refund_obj(id=f"re_$(rm -rf /) {_key()}", orderId=f"`reboot` {_key()}", currency="XXQ"),
            id=f"evt-$(rm -rf /) {_key()}",
        ),
        "failed",
        reason="XXQ",
    ),
    hostile(
        "backticks-and-quotes-in-event-id",
        envelope(
            "refund.complete",
            refund_obj(amount=-1.0),
            id=f"evt-`id`;\"'|&<>*? {_key()}",
        ),
        "failed",
        reason="negative",
    ),
    hostile(
        "event-id-255-chars",
        {**refund_event(state="bogus"), "id": id_of_length(255)},
        "failed",
        reason="Refund.state",
    ),
    hostile(
        "nested-60-inside-a-refund",
        spliced(bystander_refund(state="bogus", extra=RAW), nested(60)),
        "failed",
        reason="Refund.state",
    ),
    hostile(
        "data-missing",
        {k: v for k, v in bystander_refund().items() if k != "data"},
        "failed",
        reason="data",
    ),
    hostile("data-object-a-list", envelope("refund.complete", [_own]), "failed", reason="data"),
    hostile("data-object-null", envelope("refund.complete", None), "failed", reason="data"),
    hostile(
        "duplicate-amount-keys-last-negative",
        spliced(bystander_refund(amount=10.0, **{RAW: 0}), '"amount": -10.0'),
        "failed",
        reason="negative",
    ),
    # The last orderId wins (as in Postgres's jsonb): the bystander's, whose currency is USD.
    hostile(
        "duplicate-order-id-keys-last-the-bystander",
        spliced(
            envelope("refund.complete", refund_obj(currency="EUR", **{RAW: 0})),
            f'"orderId": "{BYSTANDER}"',
        ),
        "failed",
        reason="EUR",
    ),
    hostile(
        "charge-without-order-id",
        bystander_charge({"id": f"x_{_key()}", "amount": 1.0, "state": "complete"}, orderId=None),
        "failed",
        reason="orderId",
    ),
    hostile(
        "charge-entry-negative",
        bystander_charge({"id": BY_ENTRY, "amount": -10.0, "state": "complete"}),
        "failed",
        reason="negative",
    ),
    hostile(
        "charge-entry-without-id-or-time",
        bystander_charge({"amount": 10.0, "state": "complete"}),
        "failed",
        reason="neither id nor createdTime",
    ),
    hostile(
        "charge-currency-number",
        bystander_charge({"id": BY_ENTRY, "amount": 10.0, "state": "complete"}, currency=840),
        "failed",
        reason="currency",
    ),
    hostile(
        "order-with-charges-not-a-list",
        bystander_order("order.charge.refund.complete", payment={"charges": "all"}),
        "failed",
        reason="charges",
    ),
    hostile(
        "chargeback-garbage-object",
        envelope("order.chargeback", {"garbage": True, "nested": {"x": [1, None]}}),
        "failed",
        reason="Order.id",
    ),
    hostile(
        "chargeback-garbage-naming-the-bystander",
        envelope("order.chargeback", {"orderId": BYSTANDER, "type": 5, "amount": "lots"}),
        "failed",
        reason="SalesTransaction",
    ),
    hostile(
        "sales-transaction-amount-an-object",
        bystander_sale(amount={"value": 7}),
        "failed",
        reason="SalesTransaction.amount",
    ),
    hostile(
        "sales-transaction-amount-absurd",
        bystander_sale(amount=-1e16),
        "failed",
        reason="out of range",
    ),
    hostile(
        "order-refunded-amount-ten",
        bystander_order(refundedAmount="ten"),
        "failed",
        reason="Order.refundedAmount",
    ),
    hostile(
        "order-refunded-amount-negative",
        bystander_order(refundedAmount=-100.0),
        "failed",
        reason="negative",
    ),
    # The first copy failed during setup; a later copy with the same id but a valid body
    # (aimed at the bystander) must change nothing.
    hostile(
        "failed-event-replayed-with-a-valid-body",
        {**bystander_refund(), "id": REPLAYED_AFTER_FAILING["id"]},
        "failed",
        reason="negative",
    ),
    # Unhandled, so recorded as ignored.
    hostile(
        "unknown-type-garbage-object",
        envelope("invoice.created", {"a": [1, {"b": None}], "amount": "NaN"}),
        "ignored",
        reason="not handled",
    ),
    hostile(
        "type-in-capitals",
        {**bystander_refund(), "type": "REFUND.COMPLETE"},
        "ignored",
        reason="not handled",
    ),
    hostile(
        "type-with-sql",
        {**bystander_refund(), "type": "refund.complete'; DROP TABLE refunds;--"},
        "ignored",
        reason="not handled",
    ),
    hostile(
        "unicode-event-id",
        envelope("order.accepted", {}, id=f"évt-\u202e😀-{_key()}"),
        "ignored",
        reason="not handled",
    ),
    hostile(
        "duplicate-type-keys-last-unhandled",
        spliced({**bystander_refund(), RAW: 0}, '"type": "order.accepted"'),
        "ignored",
        reason="not handled",
    ),
    hostile(
        "duplicate-id-keys-last-wins",
        spliced(envelope("order.accepted", {}, id=_dup_first, **{RAW: 0}), f'"id": "{_dup_last}"'),
        "ignored",
        event_id=_dup_last,
    ),
    hostile(
        "sales-transaction-of-another-type",
        bystander_sale(type="sale"),
        "ignored",
        reason="not a chargeback",
    ),
    # Contract v2 keeps a refund of an invoice under the invoice (test_summary_v2); one that
    # names neither an order nor an invoice belongs to nothing.
    hostile(
        "refund-of-no-order-nor-invoice",
        refund_event(orderId=None),
        "failed",
        reason="a Refund needs orderId or invoiceId",
    ),
    # An unhandled type is ignored whatever else its envelope lacks.
    hostile(
        "unhandled-type-with-nothing-but-id-and-type",
        {"id": f"evt-{_key()}", "type": "foo.bar"},
        "ignored",
        reason="not handled",
    ),
    hostile(
        "unhandled-type-with-data-a-string",
        envelope("invoice.created", None, data="x", createdTime="yesterday"),
        "ignored",
        reason="not handled",
    ),
    hostile(
        "created-time-far-in-the-future",
        envelope("order.accepted", {}, createdTime="9999-12-31T23:59:59Z"),
        "ignored",
        reason="not handled",
    ),
    # The first copy (an unhandled type) was ignored during setup; this one, same id, is a
    # valid refund for the bystander and must not be applied.
    hostile(
        "event-id-reused-for-another-type",
        {**bystander_refund(), "id": REUSED_FOR_OTHER_TYPE["id"]},
        "ignored",
        reason="not handled",
    ),
]

# The table, as pytest parameters with readable ids.
CORPUS: list[ParameterSet] = [pytest.param(case, id=case.name) for case in CASES]

# Hostile reads of the read API (with a valid token): each is answered with a 4xx JSON
# error, never a 5xx (a 503 would page an operator about a database outage).
READS: list[ParameterSet] = [
    pytest.param("/events?limit=" + "9" * 5000, 400, id="limit-of-5000-digits"),
    pytest.param("/events?limit=-1", 400, id="limit-negative"),
    pytest.param("/events?limit=%2B5", 400, id="limit-with-a-plus-sign"),
    pytest.param("/events?limit=1e3", 400, id="limit-in-exponent-form"),
    pytest.param("/events?outcome=failed%00", 400, id="outcome-with-a-nul"),
    pytest.param("/orders/a%00b", 404, id="order-id-with-a-nul"),
    pytest.param("/events/a%00b", 404, id="event-id-with-a-nul"),
    pytest.param("/orders/%00", 404, id="order-id-only-a-nul"),
    pytest.param("/orders/" + "x" * 256, 404, id="order-id-of-256-chars"),
    pytest.param("/events/" + "x" * 5000, 404, id="event-id-of-5000-chars"),
    pytest.param("/orders/%ED%A0%80", 404, id="order-id-encoded-surrogate"),
    pytest.param("/orders/%FF%FE", 404, id="order-id-invalid-utf8"),
]


# --- sending and looking ------------------------------------------------------------------


def _post(base: str, case: Case) -> httpx.Response:
    body = case.raw
    now = int(time.time())
    headers: dict[str, str]
    match case.send:
        case "signed":
            headers = support.signed_headers(body)
        case "unsigned":
            headers = {"Content-Type": "application/json"}
        case "wrong-secret":
            headers = support.signed_headers(body, secret="whsec_not_configured")
        case "stale":
            headers = support.signed_headers(body, timestamp=now - 3600)
        case "future":
            headers = support.signed_headers(body, timestamp=now + 3600)
        case "tampered":
            headers = support.signed_headers(body + b" ")  # signs a different body
        case "garbage-signature":
            headers = {"Content-Type": "application/json", "DigitalRiver-Signature": "t=x,v0=!"}
        case "text/plain":
            headers = {**support.signed_headers(body), "Content-Type": "text/plain"}
    return httpx.post(f"{base}/webhooks/digital-river", content=body, headers=headers, timeout=30)


def _rows(stack: Stack, sql: str, **params: Any) -> list[dict[str, Any]]:
    with stack.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(sql), params)]


def _snapshot(stack: Stack, order_id: str) -> dict[str, Any]:
    """The order as the API shows it and every row stored for it."""
    response = stack.api(f"/orders/{quote(order_id, safe='')}")
    assert response.status_code == 200, response.text
    where = {"o": order_id}
    return {
        "summary": response.json(),
        "orders": _rows(stack, "SELECT * FROM orders WHERE id = :o", **where),
        "refunds": _rows(stack, "SELECT * FROM refunds WHERE order_id = :o ORDER BY id", **where),
        "charge_refunds": _rows(
            stack,
            "SELECT * FROM charge_refunds WHERE order_id = :o ORDER BY charge_id, entry_key",
            **where,
        ),
        "chargebacks": _rows(
            stack, "SELECT * FROM chargebacks WHERE order_id = :o ORDER BY id", **where
        ),
        "refund_history": _rows(
            stack, "SELECT * FROM refund_history WHERE order_id = :o ORDER BY id", **where
        ),
    }


def _lpush_calls(stack: Stack) -> int:
    """How many messages were ever pushed onto a queue (kombu publishes with LPUSH)."""
    found = re.search(r"cmdstat_lpush:calls=(\d+)", stack.redis.cli("INFO", "commandstats"))
    return int(found.group(1)) if found else 0


def _domain_rows_with(stack: Stack, markers: list[str]) -> list[str]:
    """Rows of the order tables that mention any marker (whatever the column)."""
    patterns = [f"%{marker}%" for marker in markers]
    found: list[str] = []
    for table in ("orders", "refunds", "charge_refunds", "chargebacks", "refund_history"):
        sql = f"SELECT t::text AS row FROM {table} t WHERE t::text LIKE ANY(:p)"  # noqa: S608
        rows = _rows(stack, sql, p=patterns)
        found.extend(f"{table}: {row['row'][:200]}" for row in rows)
    return found


def _event_ids_with(stack: Stack, markers: list[str], *, payload: bool) -> list[str]:
    patterns = [f"%{marker}%" for marker in markers]
    where = "id LIKE ANY(:p)" + (" OR payload::text LIKE ANY(:p)" if payload else "")
    sql = f"SELECT id FROM webhook_events WHERE {where}"  # noqa: S608 - fixed fragments
    return [row["id"] for row in _rows(stack, sql, p=patterns)]


def _storable(value: str) -> bool:
    return "\x00" not in value and not re.search("[\ud800-\udfff]", value)


def _record(stack: Stack, event_id: str) -> httpx.Response:
    return stack.api(f"/events/{quote(event_id, safe='')}")


def _stored_copy(stack: Stack, event_id: str) -> dict[str, Any]:
    rows = _rows(
        stack,
        "SELECT id, type, created_time, live_mode, payload, outcome, error, order_id,"
        " processed_at FROM webhook_events WHERE id = :i",
        i=event_id,
    )
    assert len(rows) == 1, rows
    return rows[0]


@dataclass
class Run:
    """What happened to the corpus."""

    responses: dict[str, httpx.Response] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    wait_error: str | None = None
    pushes: int = 0
    bystander_before: dict[str, Any] = field(default_factory=dict)
    first_copies_before: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_log: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def run(stack: Stack) -> Run:
    """Set up the bystander and the first copies, snapshot, send the corpus, wait once."""
    setup = [*BYSTANDER_SETUP, *FIRST_COPIES]
    for event in setup:
        response = support.post_event(stack.base, event)
        assert response.status_code == 202, response.text
    found = support.wait_finished(stack.engine, [event["id"] for event in setup])
    assert [found[e["id"]] for e in BYSTANDER_SETUP] == ["applied"] * len(BYSTANDER_SETUP)
    assert found[REUSED_FOR_OTHER_TYPE["id"]] == "ignored"
    assert found[REPLAYED_AFTER_FAILING["id"]] == "failed"

    result = Run(bystander_before=_snapshot(stack, BYSTANDER))
    result.first_copies_before = {e["id"]: _stored_copy(stack, e["id"]) for e in FIRST_COPIES}
    log_start = {process.name: len(process.log()) for process in stack.processes}
    pushes_before = _lpush_calls(stack)

    for case in CASES:
        result.responses[case.name] = _post(stack.base, case)

    accepted = sorted(
        {
            answer["id"]
            for answer in (r.json() for r in result.responses.values() if r.status_code == 202)
            # An id Postgres cannot even take as a query parameter is never recorded; its
            # case fails on its own rather than failing every query here.
            if _storable(answer["id"])
        }
    )
    reused = [e["id"] for e in FIRST_COPIES]

    def second_copies_counted() -> bool:
        rows = _rows(stack, "SELECT deliveries FROM webhook_events WHERE id = ANY(:i)", i=reused)
        return len(rows) == len(reused) and all(r["deliveries"] >= 2 for r in rows)

    try:
        support.wait_finished(stack.engine, accepted, timeout=deadlines.APPLY_S)
    except TimeoutError as exc:
        # Each case then says whether it is the one left behind.
        result.wait_error = str(exc)
    try:
        support.wait_for(
            second_copies_counted, timeout=deadlines.APPLY_S, what="second copies of reused ids"
        )
    except TimeoutError as exc:
        result.wait_error = f"{result.wait_error or ''} {exc}".strip()
    result.outcomes = support.outcomes(stack.engine, accepted)
    result.pushes = _lpush_calls(stack) - pushes_before
    result.new_log = {
        process.name: process.log()[log_start[process.name] :] for process in stack.processes
    }
    return result


# --- the checks ---------------------------------------------------------------------------


def test_corpus_is_big_and_names_are_unique() -> None:
    assert len(CASES) >= 40
    assert len(READS) >= 10
    assert len({case.name for case in CASES}) == len(CASES)
    ids = [case.recorded_as for case in CASES if case.accepted]
    assert None not in ids
    fresh = [i for i in ids if i not in {e["id"] for e in FIRST_COPIES}]
    assert len(fresh) == len(set(fresh)) == len(ids) - len(FIRST_COPIES)


@pytest.mark.parametrize("case", CORPUS)
def test_hostile_input_is_refused_or_recorded_as_failed_or_ignored(
    stack: Stack, run: Run, case: Case
) -> None:
    response = run.responses[case.name]
    if not case.accepted:
        assert str(response.status_code) == case.expected, (
            f"{case.name}: expected HTTP {case.expected}, got {response.status_code}:"
            f" {response.text[:300]}"
        )
        assert response.headers["content-type"].startswith("application/json")
        answer = response.json()
        assert isinstance(answer, dict)
        assert set(answer) == {"error", "message"}, answer
        assert isinstance(answer["error"], str)
        assert answer["error"]
        assert isinstance(answer["message"], str)
        assert answer["message"]
        if case.markers:
            queued = _event_ids_with(stack, case.markers, payload=True)
            assert queued == [], (
                f"{case.name}: refused with {case.expected}, yet recorded: {queued}"
            )
            assert _domain_rows_with(stack, case.markers) == []
        return

    assert response.status_code == 202, (
        f"{case.name}: expected 202 then {case.expected}, got {response.status_code}:"
        f" {response.text[:300]}"
    )
    answer = response.json()
    event_id = answer["id"]
    assert answer == {"id": event_id, "status": "queued"}
    if case.recorded_as is not None:
        assert event_id == case.recorded_as
    outcome = run.outcomes.get(event_id)
    assert outcome is not None, (
        f"{case.name}: accepted with 202 but never recorded by a worker (lost);"
        f" wait: {run.wait_error}"
    )
    assert outcome == case.expected, f"{case.name}: outcome {outcome}, expected {case.expected}"

    read = _record(stack, event_id)
    assert read.status_code == 200, (
        f"{case.name}: GET /events/{{id}} for {event_id!r} answered {read.status_code}:"
        f" {read.text[:200]}"
    )
    record = read.json()
    assert record["id"] == event_id
    assert record["outcome"] == case.expected
    assert isinstance(record["error"], str)
    assert record["error"].strip(), f"{case.name}: {outcome} without a reason: {record}"
    if case.reason is not None:
        assert case.reason in record["error"], f"{case.name}: reason {record['error']!r}"
    # Nothing half-written: no order row, refund, charge refund, chargeback or history row
    # mentions any id this case introduced (its event id included).
    assert _domain_rows_with(stack, case.markers) == []
    assert _event_ids_with(stack, case.markers, payload=False) == [event_id]


@pytest.mark.parametrize(("path", "expected"), READS)
def test_hostile_read_is_answered_with_a_json_4xx(stack: Stack, path: str, expected: int) -> None:
    response = stack.api(path)
    assert response.status_code == expected, f"{path[:80]}: {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert set(answer) == {"error", "message"}, answer


def test_the_bystander_order_did_not_change(stack: Stack, run: Run) -> None:
    before = run.bystander_before
    assert before["summary"]["refundStatus"] == "partially_refunded"
    assert all(before[table] for table in ("orders", "refunds", "charge_refunds", "chargebacks"))
    after = _snapshot(stack, BYSTANDER)
    for part in before:
        assert after[part] == before[part], f"bystander {part} changed"


def test_refused_inputs_queued_nothing(run: Run) -> None:
    accepted = sum(1 for r in run.responses.values() if r.status_code == 202)
    assert accepted == sum(1 for case in CASES if case.accepted)
    assert run.pushes == accepted, "messages queued other than one per 202"


def test_no_process_crashed_or_dropped_an_event(run: Run) -> None:
    symptoms = ("raised unexpected", "Traceback", "event.unrecordable", "Exception in ASGI")
    problems = [
        f"{name}: {line[:300]}"
        for name, log in run.new_log.items()
        for line in log.splitlines()
        if any(symptom in line for symptom in symptoms)
    ]
    unfinished = sorted(
        {r.json()["id"] for r in run.responses.values() if r.status_code == 202}
        - {i for i, outcome in run.outcomes.items() if outcome != "queued"}
    )
    if unfinished:
        problems.append(f"accepted but not finished: {unfinished} ({run.wait_error})")
    assert not problems, "\n".join(problems)


def test_reused_event_ids_keep_their_first_record(stack: Stack, run: Run) -> None:
    for event in FIRST_COPIES:
        before = run.first_copies_before[event["id"]]
        after = _stored_copy(stack, event["id"])
        assert after == before, f"{event['id']}: the second copy altered the first's record"
        assert after["type"] == event["type"]
        assert after["payload"] == json.loads(json.dumps(event))


def test_service_is_up_and_applies_a_valid_event_after_the_corpus(stack: Stack, run: Run) -> None:
    assert run.responses
    assert httpx.get(f"{stack.base}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{stack.base}/readyz", timeout=10).status_code == 200
    valid = refund_event()
    response = support.post_event(stack.base, valid)
    assert response.status_code == 202, response.text
    assert support.wait_finished(stack.engine, [valid["id"]]) == {valid["id"]: "applied"}
    order_id = valid["data"]["object"]["orderId"]
    summary = stack.api(f"/orders/{order_id}").json()
    assert summary["refundStatus"] == "partially_refunded"
    assert summary["refundedAmount"] == "10.00"
    assert [r["state"] for r in summary["refunds"]] == ["succeeded"]

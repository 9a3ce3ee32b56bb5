"""Pydantic schemas for DR's event envelope and the objects refundsync reads.

Unknown fields are tolerated (DR adds fields without notice). Amounts arrive as JSON
numbers in major units and are parsed as exact decimals, then rounded to the
currency's minor unit once the currency is known.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)

from models.errors import InvalidEvent
from models.money import MAX_AMOUNT, check_currency, to_minor_unit

# Deeper JSON is refused by load_json. DR's objects nest a handful of levels; without a
# fixed bound, whether a deep body parses depends on the parser's remaining recursion
# headroom, which differs between the ingest and a worker (so the ingest could accept
# with 202 a body that no worker can read, and the event would vanish).
MAX_JSON_DEPTH = 100

# A stored id of any kind (order, refund) cannot hold these: Postgres text stores no NUL,
# and an unpaired surrogate is not encodable as UTF-8.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def could_be_stored_id(value: str) -> bool:
    """Whether an id asked for (an order's, an event's) could be one that is stored: ids
    are 1-255 characters, and the database holds no NUL or unpaired surrogate."""
    return 0 < len(value) <= 255 and not _UNSTORABLE.search(value)


def _utc_instant(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # e.g. 9999-12-31T23:59:59-01:00: valid as written, past year 9999 in UTC.
        raise ValueError("instant is out of range once converted to UTC") from None


Id = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Amount = Annotated[Decimal, Field(allow_inf_nan=False)]
# An aware time, normalised to UTC while validating so that no later conversion can fail.
Instant = Annotated[AwareDatetime, AfterValidator(_utc_instant)]


class RefundState(StrEnum):
    """DR's refund states, verbatim."""

    PENDING_INFORMATION = "pending_information"
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


class EntryState(StrEnum):
    """States of a refund entry inside a Charge."""

    PENDING_INFORMATION = "pending_information"
    PENDING = "pending"
    COMPLETE = "complete"
    FAILED = "failed"


CHARGEBACK_TYPES = frozenset({"fraud_chargeback", "non_fraud_chargeback"})


class _DRModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


M = TypeVar("M", bound=_DRModel)


def _round(value: Decimal | None, currency: str) -> Decimal | None:
    return None if value is None else to_minor_unit(value, currency)


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


Text = Annotated[str, StringConstraints(max_length=1000)]
MAX_QUANTITY = 1_000_000_000
Label = Annotated[str, StringConstraints(max_length=64)]


class RefundItem(_DRModel):
    """One line of an item-level refund."""

    itemId: Id | None = None
    skuId: Id | None = None
    # A Decimal until checked: int() of a number like 1e999999999 would take minutes.
    quantity: Amount | None = None
    amount: Amount | None = None
    percent: Amount | None = None
    refundedAmount: Amount | None = None
    type: Label | None = None

    def rounded(self, currency: str) -> RefundItem:
        """The item with its amounts in the currency's minor unit; raises InvalidEvent for
        a negative quantity or amount, or a percent outside 0-100."""
        if self.quantity is not None:
            if self.quantity < 0:
                raise InvalidEvent(f"refund item quantity {str(self.quantity)[:32]} is negative")
            if self.quantity > MAX_QUANTITY or self.quantity != self.quantity.to_integral_value():
                raise InvalidEvent(
                    f"refund item quantity {str(self.quantity)[:32]} is not a whole number"
                    f" up to {MAX_QUANTITY}"
                )
        if self.percent is not None and not 0 <= self.percent <= 100:
            raise InvalidEvent(f"refund item percent {str(self.percent)[:32]} is not 0-100")
        amount = _round(self.amount, currency)
        refunded = _round(self.refundedAmount, currency)
        for value in (amount, refunded):
            if value is not None and value < 0:
                raise InvalidEvent(f"refund item amount {value} is negative")
        return self.model_copy(update={"amount": amount, "refundedAmount": refunded})

    def view(self) -> dict[str, Any]:
        """The item as the summary shows it (amounts as decimal strings)."""
        return {
            "itemId": self.itemId,
            "skuId": self.skuId,
            "quantity": None if self.quantity is None else int(self.quantity),
            "amount": _text(self.amount),
            "refundedAmount": _text(self.refundedAmount),
            "percent": _text(self.percent),
            "type": self.type,
        }


class TokenInformation(_DRModel):
    """What a customer needs to finish a `pending_information` refund."""

    # DR documents no length; a refund that cannot keep its token could not be finished.
    token: Annotated[str, StringConstraints(max_length=4096)] | None = None
    expiresTime: Instant | None = None

    def view(self) -> dict[str, Any]:
        return {"token": self.token, "expiresTime": iso(self.expiresTime)}


class Refund(_DRModel):
    """DR's Refund object (`re_...`)."""

    id: Id
    orderId: Id | None = None
    invoiceId: Id | None = None
    currency: str
    state: RefundState
    type: Label | None = None
    amount: Amount | None = None
    refundedAmount: Amount | None = None
    items: list[RefundItem] = Field(default_factory=list)
    reason: Text | None = None
    failureReason: Text | None = None
    metadata: dict[str, Any] | None = None
    expiresTime: Instant | None = None
    tokenInformation: TokenInformation | None = None
    createdTime: Instant | None = None

    @model_validator(mode="after")
    def _exact_amounts(self) -> Refund:
        currency = check_currency(self.currency)
        items = [item.rounded(currency) for item in self.items]
        for value in (self.amount, self.refundedAmount):
            if value is not None and value < 0:
                raise InvalidEvent(f"refund amount {value} is negative")
        object.__setattr__(self, "currency", currency)
        object.__setattr__(self, "amount", _round(self.amount, currency))
        object.__setattr__(self, "refundedAmount", _round(self.refundedAmount, currency))
        object.__setattr__(self, "items", items)
        # Item amounts are each in range, but an item-level refund's amount is their sum.
        total = self.requested_amount()
        if total >= MAX_AMOUNT:
            raise InvalidEvent(f"refund amount {str(total)[:32]} (sum of items) is out of range")
        return self

    def requested_amount(self) -> Decimal:
        """`amount`, or the sum of the item amounts for item-level refunds."""
        if self.amount is not None:
            return self.amount
        return sum((i.amount for i in self.items if i.amount is not None), Decimal(0))

    def refunded_amount(self) -> Decimal:
        """`refundedAmount`, or the requested amount where DR left it out."""
        if self.refundedAmount is not None:
            return self.refundedAmount
        return self.requested_amount()


class ChargeRefundEntry(_DRModel):
    """A refund entry inside a Charge. Not a Refund object and often without an id."""

    id: Id | None = None
    createdTime: Instant | None = None
    amount: Amount
    state: EntryState
    failureCode: Text | None = None
    failureMessage: Text | None = None

    @model_validator(mode="after")
    def _identifiable(self) -> ChargeRefundEntry:
        if self.id is None and self.createdTime is None:
            raise InvalidEvent("charge refund entry has neither id nor createdTime")
        return self


class Charge(_DRModel):
    """DR's Charge object."""

    id: Id
    orderId: Id | None = None
    currency: str | None = None
    refunds: list[ChargeRefundEntry] = Field(default_factory=list)

    def rounded(self, currency: str) -> Charge:
        """The charge with entry amounts in the currency's minor unit."""
        entries = [
            entry.model_copy(update={"amount": to_minor_unit(entry.amount, currency)})
            for entry in self.refunds
        ]
        for entry in entries:
            if entry.amount < 0:
                raise InvalidEvent(f"charge refund amount {entry.amount} is negative")
        return self.model_copy(update={"refunds": entries})


class Payment(_DRModel):
    """The payment block of an Order."""

    charges: list[Charge] = Field(default_factory=list)


class Order(_DRModel):
    """DR's Order object: the figures that matter for refunds."""

    id: Id
    currency: str
    upstreamId: Id | None = None
    state: Label | None = None
    totalAmount: Amount | None = None
    capturedAmount: Amount | None = None
    refundedAmount: Amount | None = None
    availableToRefundAmount: Amount | None = None
    payment: Payment | None = None

    @model_validator(mode="after")
    def _exact_amounts(self) -> Order:
        currency = check_currency(self.currency)
        object.__setattr__(self, "currency", currency)
        for name in ORDER_AMOUNTS:
            value = _round(getattr(self, name), currency)
            if value is not None and value < 0:
                raise InvalidEvent(f"order {name} {value} is negative")
            object.__setattr__(self, name, value)
        return self


# The Order's amounts the summary keeps.
ORDER_AMOUNTS = ("totalAmount", "capturedAmount", "refundedAmount", "availableToRefundAmount")


class SalesTransaction(_DRModel):
    """DR's SalesTransaction object (one per fulfilled line; chargebacks are a type)."""

    id: Id
    type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    orderId: Id
    currency: str
    amount: Amount

    @model_validator(mode="after")
    def _exact_amounts(self) -> SalesTransaction:
        currency = check_currency(self.currency)
        object.__setattr__(self, "currency", currency)
        object.__setattr__(self, "amount", to_minor_unit(self.amount, currency))
        return self


class EventData(_DRModel):
    """`data` of an event."""

    object: dict[str, Any]


class Envelope(_DRModel):
    """A DR event as delivered to the webhook."""

    id: Id
    type: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    createdTime: Instant
    # Strict: a string such as "false" is not coerced, so the DR_LIVE_MODE filter and the
    # stored processing record (which keeps real booleans only) never disagree.
    liveMode: StrictBool | None = None
    data: EventData
    digitalriverVersion: str | None = Field(
        default=None, validation_alias=AliasChoices("digitalriverVersion", "digitalRiverVersion")
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(raw: str | bytes, *, exact: bool = True) -> Any:
    """Parse JSON, numbers as exact decimals unless `exact` is False (the ingest reads only
    the envelope's strings); NaN, Infinity and nesting over MAX_JSON_DEPTH are refused
    (ValueError; RecursionError for nesting too deep for the parser itself)."""
    value = json.loads(raw, parse_float=Decimal if exact else None, parse_constant=_reject_constant)
    # Nesting cannot exceed the number of opening brackets, so a body with few of them
    # (every real DR event) skips the walk.
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    brackets = text.count("[") + text.count("{")
    if brackets > MAX_JSON_DEPTH:
        _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Raise ValueError if `value` nests deeper than MAX_JSON_DEPTH (walked level by level,
    without recursion)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]


def parse_object(model: type[M], data: object) -> M:
    """Validate `data` as `model`, turning every validation problem into InvalidEvent."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or model.__name__
        raise InvalidEvent(f"{model.__name__}.{where}: {error['msg']}") from None


def as_utc(value: datetime) -> datetime:
    """Event times compare as instants; normalise to UTC for storage and display."""
    return value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """An instant as ISO-8601 UTC with a `Z`, as DR writes them."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")

"""The event envelope check: what an event must carry to be recorded at all.

One check for every way an event arrives: the ingest answers 400 to a body that fails it,
a worker records such a message as unrecordable, and reconciliation stops on a page of
DR's Events API that holds one (rather than move its checkpoint over an event it could not
read). What the event's type then requires of its data is `models.payloads`' concern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from models.errors import InvalidEvent
from models.payloads import Instant

# Characters an event id or type must not hold: control characters (Postgres text cannot
# store NUL; the others would forge log lines) and unpaired surrogates (not encodable as
# UTF-8, so neither storable nor echoable in an answer). Queued anyway, such an event could
# never be recorded by a worker: it would vanish after a 202.
_UNUSABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_CREATED_TIME = TypeAdapter(Instant)


@dataclass(frozen=True)
class EventHeader:
    """What is recorded of an event before it is validated: enough to find it again."""

    id: str
    type: str
    created_time: datetime | None
    live_mode: bool | None
    # The order (or invoice) the event names, as far as its envelope shows: its object's
    # orderId or invoiceId, else the id of an order.* event's object (an Order).
    order_id: str | None = None


class UnusableEnvelope(InvalidEvent):
    """The event lacks what it needs to be recorded: `field` names what (None: the event is
    not a JSON object at all)."""

    def __init__(self, field: str | None) -> None:
        self.field = field
        super().__init__(
            "the event is not a JSON object"
            if field is None
            else f"the event's {field} is missing or not a usable string"
        )


def usable_text(value: object) -> str | None:
    """`value` if it can be an event's id or type: a non-blank string of at most 255
    characters with no control characters; else None."""
    if (
        isinstance(value, str)
        and value.strip()
        and len(value) <= 255
        and not _UNUSABLE.search(value)
    ):
        return value
    return None


def header_of(data: Any) -> EventHeader:
    """The envelope of a parsed event. Raises UnusableEnvelope without a usable id and type;
    a createdTime that is not an ISO time with a zone, or a liveMode that is not a boolean,
    is read as absent."""
    if not isinstance(data, dict):
        raise UnusableEnvelope(None)
    event_id, event_type = usable_text(data.get("id")), usable_text(data.get("type"))
    if event_id is None:
        raise UnusableEnvelope("id")
    if event_type is None:
        raise UnusableEnvelope("type")
    created: datetime | None
    try:
        created = _CREATED_TIME.validate_python(data.get("createdTime"))
    except ValidationError:
        created = None
    live = data.get("liveMode")
    return EventHeader(
        id=event_id,
        type=event_type,
        created_time=created,
        live_mode=live if isinstance(live, bool) else None,
        order_id=_named_order(event_type, data.get("data")),
    )


def _named_order(event_type: str, data: Any) -> str | None:
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return None
    for key in ("orderId", "invoiceId"):
        named = usable_text(obj.get(key))
        if named is not None:
            return named
    # An order.* event's object is the Order, but for order.charge.* a Charge (whose id is
    # the charge's) unless it holds payment.charges (an Order, as DR has published).
    if event_type.startswith("order.charge.") and "payment" not in obj:
        return None
    return usable_text(obj.get("id")) if event_type.startswith("order.") else None

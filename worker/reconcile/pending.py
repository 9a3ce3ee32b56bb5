"""The pending-refund check: refunds DR never reports as expired.

DR sends no event when a refund expires (a `pending_information` refund whose customer never
gave the details), so such a refund would stay pending here for ever. Refunds still pending
`REFUNDSYNC_PENDING_CHECK_SECONDS` after they were created are fetched from DR's Refunds API
(`GET /refunds/{id}`, one call each, each refund at most once per that period); when DR's
state differs, the refund DR returned is published as a `refund.updated` event of refundsync's
own and applied like any event, under the convergence rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter
from sqlalchemy import Engine

from models import orders
from models.payloads import iso
from models.settings import Settings
from worker.reconcile.dr_api import DRApiError, DRClient, ListedEvent, dumps_exact
from worker.reconcile.run import Publish, client_for, record_missing

log = logging.getLogger("refundsync.reconcile")

# Refunds asked about per run: one DR call each, so a run stays short.
PENDING_CHECK_BATCH = 200
# The event type the check publishes a changed refund as: DR's own type for a refund whose
# fields changed (the state is read from the object, never from the type).
CHECK_EVENT_TYPE = "refund.updated"
SOURCE = "pending-check"

CHANGED = Counter(
    "refundsync_pending_check_changed_total",
    "Pending refunds whose state DR's Refunds API gave otherwise, published by the check",
)


@dataclass(frozen=True)
class PendingCheck:
    """What one run did."""

    checked: int
    changed: int
    unknown: int
    api_calls: int

    def line(self) -> str:
        return (
            f"checked={self.checked} changed={self.changed} unknown={self.unknown}"
            f" api_calls={self.api_calls}"
        )


def check_event(refund: dict[str, Any], order_id: str, now: datetime) -> ListedEvent:
    """The event that carries DR's `refund` as seen at `now`. Its id names the refund and
    the state, so checks that find the same change make one event."""
    event_id = f"{SOURCE}-{refund['id']}-{refund['state']}"
    live = refund.get("liveMode")
    body = {
        "id": event_id,
        "type": CHECK_EVENT_TYPE,
        "createdTime": iso(now),
        "liveMode": live,
        "data": {"object": refund},
    }
    return ListedEvent(
        id=event_id,
        type=CHECK_EVENT_TYPE,
        created_time=now,
        live_mode=live if isinstance(live, bool) else None,
        body=dumps_exact(body),
        order_id=order_id,
    )


def check_pending(
    settings: Settings,
    engine: Engine,
    client: DRClient,
    publish: Publish,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> PendingCheck:
    """Ask DR about the refunds pending longer than the configured age."""
    now = clock()
    older_than = now - timedelta(seconds=settings.pending_check_seconds)
    with engine.connect() as conn:
        due = orders.pending_refunds(conn, older_than=older_than, limit=PENDING_CHECK_BATCH)
    calls_before = client.calls
    changed = unknown = 0
    checked: list[tuple[str, str]] = []
    try:
        for order_id, refund_id, state in due:
            refund = client.get_refund(refund_id)
            if refund is None:
                unknown += 1
                log.warning("pending_check.unknown_refund", extra={"refund_id": refund_id})
            elif refund.get("state") != state:
                event = check_event(refund, order_id, now)
                # Recorded before publishing, as reconciliation does: if the broker then
                # loses the message, the sweeper finds the event unfinished and publishes it
                # again; an earlier check that found the same change already did both.
                if record_missing(engine, [event], now, SOURCE):
                    publish(event.body, event.id, event.type, now)
                    CHANGED.inc()
                    changed += 1
                log.info(
                    "pending_check.changed",
                    extra={"refund_id": refund_id, "from": state, "to": refund.get("state")},
                )
            # Only once its answer is handled: a refund whose change could not be published
            # is asked about again on the next run, not a period later.
            checked.append((order_id, refund_id))
    finally:
        # Those asked about wait a full period before the next question, even if the run
        # stopped half way (DR unreachable): the rest are first in line next time.
        orders.mark_checked(engine, checked, now)
    summary = PendingCheck(len(checked), changed, unknown, client.calls - calls_before)
    log.info("pending_check.done", extra={"summary": summary.line()})
    return summary


def run_scheduled(settings: Settings, engine: Engine, publish: Publish) -> int:
    """The beat task's run: how many changed refunds it published (0 when it could not run)."""
    if settings.dr_api_key is None:
        return 0
    try:
        with client_for(settings) as client:
            return check_pending(settings, engine, client, publish).changed
    except DRApiError as exc:
        log.warning("pending_check.failed", extra={"error": str(exc)})
        return 0

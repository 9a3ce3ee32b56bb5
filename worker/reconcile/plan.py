"""The decisions of reconciliation, pure functions of values: the window a run lists, which
listed event it publishes, where the checkpoint may move, what counts as drift."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from models.outcome import FINAL_OUTCOMES, Outcome
from models.rules import HANDLED_EVENTS
from worker.reconcile.dr_api import DROrder

# DR's Events API keeps this much history.
RETENTION = timedelta(days=30)
# DR measures its 30 days on its own clock, at each request; starting this far inside the
# window keeps the last request of a slow run from asking for events already gone.
RETENTION_MARGIN = timedelta(minutes=10)
# A run lists its window one slice at a time and moves the checkpoint after each slice,
# so a long backfill that stops half way keeps the days it finished.
SLICE = timedelta(days=1)
# What a run asks DR's Events API for, one listing each. DR's OpenAPI file (2021-12-13)
# types `types` ("an array containing less than 20 specific event names") as a plain string,
# so whether DR reads repeated or comma-joined names is not settled by it; `type` is
# unambiguous: one event name, or a group with `*` as a wildcard. Seven listings cover
# every handled type (test_reconcile_rules checks that each is matched by exactly one);
# the other types they bring (refund.* holds legacy names) are counted and left alone.
LISTED_TYPES = (
    "order.charge.refund.*",
    "order.chargeback",
    "order.dispute",
    "order.dispute.resolved",
    "order.refunded",
    "refund.*",
    "sales_transaction.created",
)


def listed_by(pattern: str, event_type: str) -> bool:
    """Whether DR's `type` filter `pattern` matches `event_type` (`*`: any characters)."""
    return fnmatch.fnmatchcase(event_type, pattern)


@dataclass(frozen=True)
class Window:
    """The createdTime range a run lists: [start, end)."""

    start: datetime
    end: datetime
    # Set when the wanted start (the checkpoint, or --since) is older than DR keeps:
    # events created in [lost_from, start) can no longer be recovered from DR.
    lost_from: datetime | None = None


def plan_window(
    *, checkpoint: datetime | None, since: datetime | None, now: datetime, overlap: timedelta
) -> Window:
    """Where a run starts listing.

    `since` (an operator's backfill) wins; else the checkpoint minus the overlap, which
    catches events DR made visible late; with neither, all that DR still keeps. Never
    earlier than DR's 30 days.
    """
    earliest = now - RETENTION + RETENTION_MARGIN
    if since is not None:
        wanted, needed = since, since
    elif checkpoint is not None:
        wanted, needed = checkpoint - overlap, checkpoint
    else:
        wanted, needed = earliest, None
    lost_from = needed if needed is not None and needed < earliest else None
    return Window(start=min(max(wanted, earliest), now), end=now, lost_from=lost_from)


def slices(
    start: datetime, end: datetime, size: timedelta = SLICE
) -> list[tuple[datetime, datetime]]:
    """[start, end) cut into consecutive ranges of at most `size`, oldest first."""
    cuts: list[tuple[datetime, datetime]] = []
    while start < end:
        cuts.append((start, min(start + size, end)))
        start += size
    return cuts


class Verdict(StrEnum):
    """What a run does with one listed event."""

    MISSING = "missing"  # never recorded: record it, publish it
    STUCK = "stuck"  # recorded, unfinished for longer than a message takes: publish again
    IN_FLIGHT = "in_flight"  # recorded a moment ago, unfinished: its message is on its way
    DONE = "done"  # finished (applied, stale, ignored or failed): nothing to do
    OTHER_TYPE = "other_type"  # not a handled type (DR ignored the filter): left alone


PUBLISHED_VERDICTS = frozenset({Verdict.MISSING, Verdict.STUCK})


@dataclass(frozen=True)
class Known:
    """What webhook_events says of a listed event."""

    outcome: Outcome
    received_at: datetime


def verdict(
    event_type: str, known: Known | None, *, now: datetime, stuck_after: timedelta
) -> Verdict:
    """Whether a listed event must be published."""
    if event_type not in HANDLED_EVENTS:
        return Verdict.OTHER_TYPE
    if known is None:
        return Verdict.MISSING
    if known.outcome in FINAL_OUTCOMES:
        return Verdict.DONE
    # The sweeper's threshold: younger than this, the event's message is most likely
    # still queued, and another copy would only be a duplicate.
    return Verdict.STUCK if now - known.received_at >= stuck_after else Verdict.IN_FLIGHT


def next_checkpoint(current: datetime | None, listed: Iterable[datetime]) -> datetime | None:
    """The checkpoint after a slice was listed and published in full: the newest event
    seen, never moving back. (Moved after each complete slice only: DR does not state its
    sort order, so no earlier point proves that nothing older is still to come.)"""
    newest = max(listed, default=None)
    if newest is None:
        return current
    return newest if current is None or newest > current else current


@dataclass(frozen=True)
class Drift:
    """An order whose refunded amount differs from DR's."""

    order_id: str
    currency: str | None
    ours: Decimal
    # None: DR does not know the order (a key for the other mode, or a deleted order).
    dr: Decimal | None


def drift(order_id: str, currency: str | None, ours: Decimal, dr: DROrder | None) -> Drift | None:
    """A Drift when our refundedAmount and DR's order figure differ, else None.

    An Order without `refundedAmount` has refunded nothing.
    """
    if dr is None:
        return Drift(order_id, currency, ours, None)
    theirs = dr.refunded_amount if dr.refunded_amount is not None else Decimal(0)
    return None if theirs == ours else Drift(order_id, currency, ours, theirs)

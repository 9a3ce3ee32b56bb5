"""Prometheus metrics of the workers, served by each worker's main process."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import (
    Counter,
    Histogram,
    start_http_server,
)

from models.outcome import Outcome
from models.rules import HANDLED_EVENTS
from models.telemetry import service_registry

# The outcome of a message with no usable event id, which nothing can be recorded against:
# its metric label and its task's result.
UNRECORDABLE = "unrecordable"

EVENTS = Counter(
    "refundsync_events_total",
    "Event copies processed, by type and outcome (duplicate: already finished)",
    ["type", "outcome"],
)
REFUSED = Counter(
    "refundsync_messages_refused_total",
    "events.apply messages refused, never applied: not sealed by refundsync",
)
_AGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)
APPLY_AGE = Histogram(
    "refundsync_event_apply_age_seconds",
    "Age of an event when applied: since DR created it (dr_created) or the ingest got it",
    ["since"],
    buckets=_AGE_BUCKETS,
)


def type_label(event_type: str | None) -> str:
    """The event type, or `other`: labels stay few whatever types arrive."""
    return event_type if event_type in HANDLED_EVENTS else "other"


def observe(
    event_type: str | None,
    outcome: Outcome | None,
    *,
    duplicate: bool,
    received_at: datetime,
    created_time: datetime | None,
) -> None:
    """Count one processed copy; time it if it was applied."""
    label = "duplicate" if duplicate else (outcome.value if outcome else UNRECORDABLE)
    EVENTS.labels(type=type_label(event_type), outcome=label).inc()
    if outcome is Outcome.APPLIED and not duplicate:
        now = datetime.now(UTC)
        APPLY_AGE.labels(since="received").observe(max((now - received_at).total_seconds(), 0))
        if created_time is not None:
            age = max((now - created_time).total_seconds(), 0)
            APPLY_AGE.labels(since="dr_created").observe(age)


def serve(address: str) -> None:
    """Serve /metrics for this worker (main process and pool) at `host:port`."""
    host, _, port = address.rpartition(":")
    registry = service_registry()
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)  # noqa: S104


DELIVERIES = Counter(
    "refundsync_notify_deliveries_total",
    "Attempts to POST a change to REFUNDSYNC_NOTIFY_URL, by what followed: delivered, retry, dead",
    ["outcome"],
)
DELIVERY_SECONDS = Histogram(
    "refundsync_notify_seconds",
    "Time of one POST to REFUNDSYNC_NOTIFY_URL, answered or not",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
NOTIFY_LATENCY = Histogram(
    "refundsync_notify_delay_seconds",
    "From a change's commit to its delivery (a 2xx from the receiver)",
    buckets=_AGE_BUCKETS,
)

JOURNAL_REPUBLISHED = Counter(
    "refundsync_journal_republished_total",
    "Events published again from the ingest's journal: accepted, never recorded in Postgres",
)

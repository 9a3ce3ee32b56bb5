"""Prometheus metrics of the ingest, and the state gauges read at scrape time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from prometheus_client import (
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from models import feed, ledger, outbox
from models.telemetry import service_registry
from worker.queue.journal import State

log = logging.getLogger("refundsync.ingest")

_SCRAPE = threading.Lock()

WEBHOOKS = Counter(
    "refundsync_webhooks_received_total", "Webhook requests answered, by status code", ["code"]
)
SIGNATURE_FAILURES = Counter(
    "refundsync_signature_failures_total", "Webhook requests refused for their signature"
)
INGEST_SECONDS = Histogram(
    "refundsync_ingest_seconds",
    "Time to answer a webhook request, reading the body to the answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


JOURNAL_FULL = Counter(
    "refundsync_journal_full_total",
    "Events queued without a journal entry: the journal held REFUNDSYNC_JOURNAL_MAX_ENTRIES",
)
# The journal as /metrics shows it when Redis does not answer.
JOURNAL_UNREADABLE = State(-1, -1.0)
_full_logged = 0.0


def journal_full(count: int) -> None:
    """Count events queued without a journal entry; log it at most once a minute."""
    global _full_logged
    JOURNAL_FULL.inc(count)
    if time.monotonic() - _full_logged >= 60:
        _full_logged = time.monotonic()
        log.error("journal.full", extra={"unjournaled": count})


class StateCollector(Collector):
    """Gauges of what is waiting and what failed, read from Redis and Postgres per scrape."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self._engine = engine
        self.queue_depth = 0
        self.journal: State | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "refundsync_queue_depth", "Messages waiting in the worker queue (-1: Redis down)"
        )
        depth.add_metric([], self.queue_depth)
        yield depth
        if self.journal is not None:
            size = GaugeMetricFamily(
                "refundsync_journal_entries",
                "Accepted events kept in the ingest's journal until Postgres records them"
                " (-1: Redis down)",
            )
            size.add_metric([], self.journal.size)
            oldest = GaugeMetricFamily(
                "refundsync_journal_oldest_entry_age_seconds",
                "Age of the journal's oldest entry, since written or last published again"
                " (0: empty; -1: Redis down)",
            )
            oldest.add_metric([], self.journal.oldest_age_s)
            yield size
            yield oldest
        oldest = GaugeMetricFamily(
            "refundsync_oldest_unfinished_event_age_seconds",
            "Age of the oldest event received but not finished (0: none; -1: database down)",
        )
        failed = GaugeMetricFamily(
            "refundsync_failed_events", "Events whose outcome is failed (-1: database down)"
        )
        try:
            with self._engine().connect() as conn:
                backlog = ledger.backlog(conn)
            oldest.add_metric([], backlog.oldest_unfinished_age_s)
            failed.add_metric([], backlog.failed)
        except SQLAlchemyError:
            oldest.add_metric([], -1)
            failed.add_metric([], -1)
        yield oldest
        yield failed
        yield from self._outbound()

    def _outbound(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "refundsync_notify_undelivered",
            "Changes waiting to be delivered to REFUNDSYNC_NOTIFY_URL (-1: database down)",
        )
        oldest = GaugeMetricFamily(
            "refundsync_notify_oldest_undelivered_age_seconds",
            "Age of the oldest change not yet delivered (0: none; -1: database down)",
        )
        lag = GaugeMetricFamily(
            "refundsync_changes_feed_lag_seconds",
            "How long the oldest committed change has waited for older transactions to end"
            " before GET /changes can return it (0: none; -1: database down)",
        )
        try:
            now = datetime.now(UTC)
            with self._engine().connect() as conn:
                count, age = outbox.backlog(conn, now)
                behind = feed.lag_seconds(conn, now)
            waiting.add_metric([], count)
            oldest.add_metric([], age)
            lag.add_metric([], behind)
        except SQLAlchemyError:
            for family in (waiting, oldest, lag):
                family.add_metric([], -1)
        yield waiting
        yield oldest
        yield lag


def exposition(state: StateCollector, queue_depth: int, journal: State | None) -> bytes:
    """Every metric in Prometheus text format, added up over the service's processes.

    `queue_depth` and `journal` are read by the caller on the event loop (the Redis client
    is async); `journal` is None where the broker keeps none (the standalone mode).
    """
    registry = service_registry()
    # Scrapes run in threads; the state collector joins the shared registry one at a time.
    with _SCRAPE:
        state.queue_depth = queue_depth
        state.journal = journal
        registry.register(state)
        try:
            return generate_latest(registry)
        finally:
            registry.unregister(state)

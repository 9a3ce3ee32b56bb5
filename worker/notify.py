"""Outbound webhooks: each change of the feed POSTed to REFUNDSYNC_NOTIFY_URL, signed the
Standard Webhooks way, order by order (models.outbox), with backoff up to
REFUNDSYNC_NOTIFY_MAX_AGE_SECONDS.

A task `notify.deliver(order, version)` delivers the order's undelivered changes, oldest
first (the version names the change that announced it, for monitors). The worker applying
events announces each order it changed after its commit; a failed POST schedules its own
retry when the wait is short; beat's sweep publishes what is due again (a longer retry, an
announcement lost with its worker). The receiver's errors are its own: they are recorded
and retried, and never reach the apply path.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from time import monotonic
from typing import Any

import httpx
import orjson
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from standardwebhooks import Webhook

from models import outbox
from models.db import transaction
from models.logs import brief
from models.settings import Settings
from worker import metrics
from worker.processing import Result
from worker.queue import republish

log = logging.getLogger("refundsync.notify")

EVENT_TYPE = "order.refund_summary.updated"
# A receiver's answer is read up to this much, then the connection is dropped: the status is
# all that counts, and the body is never stored.
MAX_RESPONSE_BYTES = 65_536


def task_time_limit(settings: Settings) -> float:
    """The hard limit of a delivery task. It starts no POST after REFUNDSYNC_NOTIFY_TIMEOUT_
    SECONDS, and each POST ends within about that too."""
    return settings.notify_timeout_seconds * 2 + 10


def lease_seconds(settings: Settings) -> float:
    """How long a head stays leased to the worker POSTing it: past the task's hard limit, so
    a lease only ever expires on a worker that died."""
    return task_time_limit(settings) + 5


def announce_after_seconds(settings: Settings) -> float:
    """A change no task took up this long after it (its announcement lost with a worker or
    to a Redis outage) is published again by the sweep."""
    return max(10.0, 2.0 * settings.sweep_interval_seconds)


@dataclass
class _Client:
    url: str
    webhook: Webhook
    http: httpx.Client


_client: _Client | None = None


def reset() -> None:
    """Forget this process's HTTP client (connections must never cross a fork) and pause."""
    global _client, _pause
    _client = None
    _pause = _Pause()


def _client_for(settings: Settings) -> _Client:
    global _client
    if _client is None:
        assert settings.notify_url is not None  # noqa: S101 - callers check it
        assert settings.notify_secret is not None  # noqa: S101 - validated as a pair
        _client = _Client(
            settings.notify_url,
            Webhook(settings.notify_secret.get_secret_value()),
            httpx.Client(
                timeout=settings.notify_timeout_seconds,
                # A redirect is an answer that is not a 2xx: the signed body goes only where
                # it was configured to go.
                follow_redirects=False,
                headers={"user-agent": "refundsync"},
            ),
        )
    return _client


def post(settings: Settings, change: dict[str, Any], now: datetime) -> outbox.Attempt:
    """POST one change; never raises for what the receiver or the network does."""
    client = _client_for(settings)
    body = orjson.dumps(
        {"type": EVENT_TYPE, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": change}
    )
    msg_id = change["cursor"]
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": client.webhook.sign(msg_id, now, body.decode()),
    }
    started = monotonic()
    deadline = started + settings.notify_timeout_seconds
    try:
        with client.http.stream("POST", client.url, content=body, headers=headers) as response:
            read = 0
            for chunk in response.iter_raw():
                read += len(chunk)
                if read > MAX_RESPONSE_BYTES or monotonic() > deadline:
                    break  # closing drops the rest with the connection
            status = response.status_code
    except httpx.HTTPError as exc:
        return outbox.Attempt(None, _ms(started), f"{type(exc).__name__}: {brief(str(exc))}")
    except SoftTimeLimitExceeded:
        # A receiver that trickles its answer past every read timeout.
        return outbox.Attempt(None, _ms(started), "timed out: the receiver answered too slowly")
    error = None if 200 <= status < 300 else f"HTTP {status}"
    if 300 <= status < 400:
        error = f"HTTP {status}: redirects are not followed"
    return outbox.Attempt(status, _ms(started), error)


def _ms(started: float) -> int:
    return int((monotonic() - started) * 1000)


@dataclass
class _Pause:
    """This process's pause after POSTs that got no answer at all (refused, timed out).

    Each order's retries back off on their own, but a receiver that is down or hangs fails
    every order's head alike: without a pause, each order's first attempts would cost a
    pool process a timeout each, and the events waiting behind them would wait too. So
    after such a failure this process makes no POST for a while (doubling with each one in
    a row, with jitter, up to the backoff cap); one answer of any kind ends it.
    """

    failures: int = 0
    until: float = 0.0

    def left(self) -> float:
        return self.until - monotonic()

    def after(self, attempt: outbox.Attempt, cap_s: float) -> None:
        if attempt.status is not None:
            self.failures, self.until = 0, 0.0
            return
        self.failures += 1
        pause = min(cap_s, outbox.FIRST_BACKOFF_S * 2 ** min(self.failures - 1, 40))
        self.until = monotonic() + pause * (0.5 + random.random() / 2)  # noqa: S311


_pause = _Pause()


@dataclass(frozen=True)
class Outcome:
    """What a delivery task did: changes delivered, and whether more of the order remain."""

    delivered: int = 0
    retry_in_s: float | None = None
    more: bool = False


def deliver(settings: Settings, engine: Any, order_key: str) -> Outcome:
    """Deliver the order's changes, head first, until none is left, the head fails (its
    retry is scheduled) or is not due, another worker holds the order, or this task's time
    is up (the rest goes to a new task)."""
    if settings.notify_url is None:
        return Outcome()
    delivered = 0
    started = monotonic()
    while True:
        if monotonic() - started > settings.notify_timeout_seconds:
            # The rest goes to a new task: this one stays inside its time limit.
            return Outcome(delivered, more=True)
        if _pause.left() > 0:
            # Left to the sweep, which publishes the order again once its head is due.
            return Outcome(delivered)
        now = datetime.now(UTC)
        with transaction(engine) as conn:
            head = outbox.lease_head(conn, order_key, now, lease_seconds(settings))
        if head is None:
            return Outcome(delivered)
        attempt = post(settings, head.change, now)
        done_at = datetime.now(UTC)
        step = outbox.next_step(
            attempt,
            head.attempt,
            head.since,
            done_at,
            max_age_s=settings.notify_max_age_seconds,
            backoff_max_s=settings.notify_backoff_max_seconds,
            jitter=random.random(),  # noqa: S311 - spreading retries, not a secret
        )
        with transaction(engine) as conn:
            outbox.record(conn, head, attempt, step, done_at)
        _observe(head, attempt, step)
        _pause.after(attempt, settings.notify_backoff_max_seconds)
        if step.delivery == outbox.PENDING:
            assert step.next_attempt_at is not None  # noqa: S101 - pending has a time
            return Outcome(delivered, (step.next_attempt_at - done_at).total_seconds())
        delivered += step.delivery == outbox.DELIVERED


def _observe(head: outbox.Head, attempt: outbox.Attempt, step: outbox.Step) -> None:
    outcome = "retry" if step.delivery == outbox.PENDING else step.delivery
    metrics.DELIVERIES.labels(outcome=outcome).inc()
    metrics.DELIVERY_SECONDS.observe(attempt.latency_ms / 1000)
    fields = {
        "order_id": head.order_key,
        "version": head.version,
        "webhook_id": head.change["cursor"],
        "attempt": head.attempt,
        "status": attempt.status,
        "latency_ms": attempt.latency_ms,
    }
    if step.delivery == outbox.DELIVERED:
        age = (datetime.now(UTC) - head.since).total_seconds()
        metrics.NOTIFY_LATENCY.observe(max(age, 0.0))
        log.debug("notify.delivered", extra=fields)
    elif step.delivery == outbox.DEAD:
        log.error("notify.dead", extra={**fields, "error": attempt.error})
    else:
        log.info("notify.retry", extra={**fields, "error": attempt.error})


def announce(app: Celery, settings: Settings, results: Iterable[Result | None]) -> None:
    """After the commit: one notify.deliver message for each order the events changed.
    Best effort: a message that cannot be published is sent by the sweep later, and a
    delivery problem never fails the events."""
    if settings.notify_url is None:
        return
    newest = newest_versions(
        (result.order_id, result.version) for result in results if result is not None
    )
    if not newest:
        return
    try:
        republish.announce(app, settings.queue, newest)
    except Exception as exc:  # noqa: BLE001 - whatever stopped the publish
        log.warning("notify.announce_failed", extra={"orders": len(newest), "error": str(exc)})


def newest_versions(results: Iterable[tuple[str | None, int | None]]) -> dict[str, int]:
    """Each changed order's newest version among applied events: one delivery task per
    order delivers all of them in order."""
    newest: dict[str, int] = {}
    for order_key, version in results:
        if order_key is not None and version is not None:
            newest[order_key] = max(version, newest.get(order_key, 0))
    return newest

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

import http.client
import logging
import random
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from time import monotonic
from typing import Any
from urllib.parse import urlsplit

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


class _Endpoint:
    """This process's connection to REFUNDSYNC_NOTIFY_URL, kept open between POSTs.

    The standard library's HTTP client: a POST costs a fraction of a millisecond of CPU,
    where a general-purpose client costs several, and a worker makes one per change. It
    follows no redirect (a redirect is an answer that is not a 2xx: the signed body goes
    only where it was configured to go), and every socket operation has the timeout.
    """

    def __init__(self, url: str, secret: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.host_header = parts.netloc.rpartition("@")[2]
        self.timeout = timeout
        self.webhook = Webhook(secret)
        self.connection: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.connection is None:
            if self.https:
                self.connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=_tls()
                )
            else:
                self.connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout
                )
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def post(self, body: bytes, headers: dict[str, str]) -> int:
        """The answer's status; raises OSError or http.client.HTTPException."""
        connection = self._connection()
        try:
            connection.request("POST", self.target, body=body, headers=headers)
            response = connection.getresponse()
            # The status is all that counts; a body is read to keep the connection, up to
            # a limit, past which the connection is dropped with the rest.
            response.read(MAX_RESPONSE_BYTES)
            if not response.isclosed() or response.will_close:
                self.close()
        except BaseException:
            self.close()
            raise
        return response.status


@cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


_endpoint: _Endpoint | None = None


def reset() -> None:
    """Forget this process's connection (connections must never cross a fork), pause and
    waiting announcements (a forked process has none of its own)."""
    global _endpoint, _pause, _announcer
    if _endpoint is not None:
        _endpoint.close()
    _endpoint = None
    _pause = _Pause()
    _announcer = _Announcer()


def flush() -> None:
    """Publish the announcements waiting in this process (as it stops)."""
    _announcer.flush()


def _endpoint_for(settings: Settings) -> _Endpoint:
    global _endpoint
    if _endpoint is None:
        assert settings.notify_url is not None  # noqa: S101 - callers check it
        assert settings.notify_secret is not None  # noqa: S101 - validated as a pair
        _endpoint = _Endpoint(
            settings.notify_url,
            settings.notify_secret.get_secret_value(),
            settings.notify_timeout_seconds,
        )
    return _endpoint


def post(settings: Settings, change: dict[str, Any], now: datetime) -> outbox.Attempt:
    """POST one change; never raises for what the receiver or the network does."""
    endpoint = _endpoint_for(settings)
    body = orjson.dumps(
        {"type": EVENT_TYPE, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": change}
    )
    msg_id = change["cursor"]
    headers = {
        "Host": endpoint.host_header,
        "User-Agent": "refundsync",
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": endpoint.webhook.sign(msg_id, now, body.decode()),
    }
    started = monotonic()
    try:
        status = endpoint.post(body, headers)
    except (OSError, http.client.HTTPException) as exc:
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
    """What a delivery task did: changes delivered; orders whose failed head is to be tried
    again, with the wait; orders it had no time left for."""

    delivered: int = 0
    retry_in_s: dict[str, float] = field(default_factory=dict)
    more: list[str] = field(default_factory=list)


def deliver(settings: Settings, engine: Any, order_keys: list[str]) -> Outcome:
    """Deliver the orders' undelivered changes, each order's oldest first: one round of
    leases for every order, their POSTs, one write of what came of them, and again for the
    orders that moved on, until none is left, a head fails or is not due, another worker
    holds the order, or this task's time is up."""
    if settings.notify_url is None:
        return Outcome()
    delivered = 0
    retry: dict[str, float] = {}
    started = monotonic()
    waiting = sorted(set(order_keys))
    while waiting:
        if monotonic() - started > settings.notify_timeout_seconds:
            # The rest goes to a new task: this one stays inside its time limit.
            return Outcome(delivered, retry, waiting)
        if _pause.left() > 0:
            # Left to the sweep, which publishes the orders again once their heads are due.
            break
        with transaction(engine) as conn:
            heads = outbox.lease_heads(conn, waiting, datetime.now(UTC), lease_seconds(settings))
        done = [_attempt(settings, head, started) for head in heads]
        with transaction(engine) as conn:
            outbox.record(conn, done)
        waiting = []
        for item in done:
            if item.attempt is None or item.step is None:
                waiting.append(item.head.order_key)  # not tried: no time, or paused
                continue
            _observe(item.head, item.attempt, item.step)
            if item.step.delivery == outbox.PENDING:
                assert item.step.next_attempt_at is not None  # noqa: S101 - pending has a time
                retry[item.head.order_key] = (item.step.next_attempt_at - item.at).total_seconds()
            else:
                delivered += item.step.delivery == outbox.DELIVERED
                if item.head.more:
                    waiting.append(item.head.order_key)
    return Outcome(delivered, retry)


def _attempt(settings: Settings, head: outbox.Head, started: float) -> outbox.Done:
    """POST a leased head, unless this process is pausing its POSTs or the task's time is
    up: then its lease is only given back."""
    now = datetime.now(UTC)
    late = monotonic() - started > settings.notify_timeout_seconds
    if late or _pause.left() > 0:
        return outbox.Done(head, None, None, now)
    attempt = post(settings, head.change, now)
    _pause.after(attempt, settings.notify_backoff_max_seconds)
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
    return outbox.Done(head, attempt, step, done_at)


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


# Announcements wait in the pool process up to this long, or until this many orders, so
# that one notify.deliver carries many orders: a task of its own per applied batch cost
# more than its POSTs (benchmark 6).
ANNOUNCE_WAIT_S = 0.05
ANNOUNCE_ORDERS = republish.ANNOUNCE_BATCH


class _Announcer:
    """This process's announcements not yet published. Lost with the process if it dies
    within ANNOUNCE_WAIT_S: the sweep publishes such changes later."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.newest: dict[str, int] = {}
        self.timer: threading.Timer | None = None
        self.target: tuple[Celery, Settings] | None = None

    def add(self, app: Celery, settings: Settings, newest: dict[str, int]) -> None:
        with self.lock:
            self.target = (app, settings)
            for order_key, version in newest.items():
                self.newest[order_key] = max(version, self.newest.get(order_key, 0))
            if len(self.newest) < ANNOUNCE_ORDERS:
                if self.timer is None:
                    self.timer = threading.Timer(ANNOUNCE_WAIT_S, self.flush)
                    self.timer.daemon = True
                    self.timer.start()
                return
        self.flush()

    def flush(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            newest, self.newest = self.newest, {}
            target = self.target
        if not newest or target is None:
            return
        app, settings = target
        try:
            republish.announce(app, settings.queue, newest)
        except Exception as exc:  # noqa: BLE001 - whatever stopped the publish
            log.warning("notify.announce_failed", extra={"orders": len(newest), "error": str(exc)})


_announcer = _Announcer()


def announce(app: Celery, settings: Settings, results: Iterable[Result | None]) -> None:
    """After the commit: announce each order the events changed, for a notify.deliver
    (gathered with other commits' for up to ANNOUNCE_WAIT_S). Best effort: a message that
    cannot be published is sent by the sweep later, and a delivery problem never fails
    the events."""
    if settings.notify_url is None:
        return
    newest = newest_versions(
        (result.order_id, result.version) for result in results if result is not None
    )
    if newest:
        _announcer.add(app, settings, newest)


def newest_versions(results: Iterable[tuple[str | None, int | None]]) -> dict[str, int]:
    """Each changed order's newest version among applied events: one delivery task per
    order delivers all of them in order."""
    newest: dict[str, int] = {}
    for order_key, version in results:
        if order_key is not None and version is not None:
            newest[order_key] = max(version, newest.get(order_key, 0))
    return newest

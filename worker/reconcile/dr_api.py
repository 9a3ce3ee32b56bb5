"""A small client for the parts of DR's REST API that reconciliation reads.

`GET /events` (cursor pages of at most 100, 30 days back) and `GET /orders/{id}`. Calls
are bounded by connect and read timeouts; 429, 5xx and transport failures are retried a
bounded number of times, waiting what `Retry-After` asks for, else exponential backoff
with jitter. Every other failure is one typed error with a message fit for operators.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from models.envelope import UnusableEnvelope, header_of
from models.errors import InvalidEvent, RefundSyncError
from models.payloads import Order, Refund, iso, load_json, parse_object

log = logging.getLogger("refundsync.dr_api")

PAGE_LIMIT = 100
USER_AGENT = "refundsync/0.1"


class DRApiError(RefundSyncError):
    """The DR API did not give a usable answer."""


class DRApiUnavailable(DRApiError):
    """DR's API kept failing (429, 5xx, timeouts, connection errors) past every retry."""


class DRApiRefused(DRApiError):
    """DR refused the request (a 4xx other than 429): a wrong key, URL or parameter."""


class DRApiMalformed(DRApiError):
    """DR answered 2xx with something that is not the documented shape."""


class _Retryable(Exception):
    """A response worth another try, with the wait DR asked for, if any."""

    def __init__(self, description: str, retry_after: float | None) -> None:
        super().__init__(description)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one call. Tests shorten the waits; production keeps the defaults."""

    attempts: int = 6
    # Exponential backoff with full jitter: the n-th wait is uniform in
    # [0, min(backoff_max_s, backoff_s * 2**n)].
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    # A Retry-After longer than this ends the call instead: the next scheduled run comes
    # sooner than waiting in a worker would.
    max_retry_after_s: float = 120.0


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for a connection, and for each read of a response."""

    connect: float = 5.0
    read: float = 30.0


@dataclass(frozen=True)
class ListedEvent:
    """One event of a `GET /events` page: its envelope fields and its exact JSON text."""

    id: str
    type: str
    created_time: datetime
    live_mode: bool | None
    body: str
    order_id: str | None = None


@dataclass(frozen=True)
class EventPage:
    """One page of `GET /events`."""

    events: tuple[ListedEvent, ...]
    has_more: bool


@dataclass(frozen=True)
class DROrder:
    """What the drift check reads of DR's Order."""

    id: str
    currency: str
    refunded_amount: Decimal | None


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds from `now`: delta-seconds or an HTTP date; None if absent
    or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - now).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def dumps_exact(value: Any) -> str:
    """JSON text of a value parsed by `load_json`, with every number written as it was
    read: amounts never pass through binary floats."""
    if isinstance(value, dict):
        items = ",".join(f"{json.dumps(key)}:{dumps_exact(item)}" for key, item in value.items())
        return "{" + items + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps_exact(item) for item in value) + "]"
    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value)


def parse_event_page(data: Any, where: str) -> EventPage:
    """Check a parsed `GET /events` answer and split it into events.

    Raises DRApiMalformed naming the first thing wrong: the run must stop rather than move
    its checkpoint over events it could not read.
    """
    if not isinstance(data, dict):
        raise DRApiMalformed(f"{where}: the answer is not a JSON object")
    has_more, items = data.get("hasMore"), data.get("data")
    if not isinstance(has_more, bool):
        raise DRApiMalformed(f"{where}: hasMore is missing or not a boolean")
    if not isinstance(items, list):
        raise DRApiMalformed(f"{where}: data is missing or not a list")
    events = []
    for index, item in enumerate(items):
        events.append(_listed_event(item, f"{where}: data[{index}]"))
    if has_more and not events:
        # Paging on would ask for the same page again, forever.
        raise DRApiMalformed(f"{where}: hasMore is true on an empty page")
    return EventPage(tuple(events), has_more)


def _listed_event(item: Any, where: str) -> ListedEvent:
    try:
        header = header_of(item)
    except UnusableEnvelope as exc:
        if exc.field is None:
            raise DRApiMalformed(f"{where} is not an object") from None
        raise DRApiMalformed(f"{where}.{exc.field} is missing or not a usable string") from None
    if header.created_time is None:
        # Reconciliation pages by it: an event without one cannot be placed.
        raise DRApiMalformed(f"{where}.createdTime is missing or not an ISO time")
    return ListedEvent(
        id=header.id,
        type=header.type,
        created_time=header.created_time,
        live_mode=header.live_mode,
        body=dumps_exact(item),
        order_id=header.order_id,
    )


class DRClient:
    """DR's REST API with a secret key. One instance per run; close() when done."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.calls = 0
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
            # A redirect would carry the key elsewhere; DR's API does not redirect.
            follow_redirects=False,
        )

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def __enter__(self) -> DRClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def list_events(
        self,
        event_type: str,
        *,
        created_gte: datetime,
        created_lt: datetime,
        limit: int = PAGE_LIMIT,
    ) -> Iterator[EventPage]:
        """Every event that DR's `type` filter `event_type` (a name, or a group with `*`)
        matches, created in [created_gte, created_lt), page by page.

        Pages follow the `startingAfter` cursor (the last event of the previous page), so
        the listing is complete whichever order DR sorts in.
        """
        cursor: str | None = None
        cursors: set[str] = set()
        number = 1
        while True:
            params: list[tuple[str, str]] = [
                ("type", event_type),
                ("createdTime[gte]", iso(created_gte) or ""),
                ("createdTime[lt]", iso(created_lt) or ""),
                ("limit", str(limit)),
            ]
            if cursor is not None:
                params.append(("startingAfter", cursor))
            where = f"GET /events?type={event_type} page {number}"
            page = parse_event_page(self._get_json("/events", params, where), where)
            yield page
            if not page.has_more:
                return
            cursor = page.events[-1].id
            if cursor in cursors:
                raise DRApiMalformed(f"{where}: the cursor {cursor} came back; paging would loop")
            cursors.add(cursor)
            number += 1

    def get_order(self, order_id: str) -> DROrder | None:
        """DR's order `order_id`, or None if DR does not know it."""
        where = f"GET /orders/{order_id}"
        data = self._get_json(f"/orders/{quote(order_id, safe='')}", [], where, missing_ok=True)
        if data is None:
            return None
        try:
            order = Order.model_validate(data)
        except (ValidationError, InvalidEvent) as exc:
            raise DRApiMalformed(f"{where}: not an Order: {str(exc).splitlines()[0]}") from None
        return DROrder(order.id, order.currency, order.refundedAmount)

    def get_refund(self, refund_id: str) -> dict[str, Any] | None:
        """DR's refund `refund_id` as DR wrote it (numbers exact), or None if DR does not
        know it. Raises DRApiMalformed unless it reads as a Refund with that id."""
        where = f"GET /refunds/{refund_id}"
        data = self._get_json(f"/refunds/{quote(refund_id, safe='')}", [], where, missing_ok=True)
        if data is None:
            return None
        try:
            refund = parse_object(Refund, data)
        except InvalidEvent as exc:
            raise DRApiMalformed(f"{where}: not a Refund: {str(exc).splitlines()[0]}") from None
        if refund.id != refund_id:
            raise DRApiMalformed(f"{where}: the answer is refund {refund.id[:64]}")
        assert isinstance(data, dict)  # noqa: S101 - parse_object accepted it as an object
        return data

    def _get_json(
        self, path: str, params: list[tuple[str, str]], where: str, *, missing_ok: bool = False
    ) -> Any:
        retrying = Retrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=self._wait,
            retry=retry_if_exception(self._worth_retrying),
            before_sleep=lambda state: self._log_retry(state, where),
            reraise=True,
        )
        try:
            response = retrying(self._get, path, params, where)
        except _Retryable as exc:
            if exc.retry_after is not None and exc.retry_after > self.retry.max_retry_after_s:
                raise DRApiUnavailable(
                    f"{where}: {exc} asking to wait {exc.retry_after:.0f} s, longer than"
                    f" the {self.retry.max_retry_after_s:.0f} s a run waits"
                ) from None
            raise DRApiUnavailable(f"{where}: {exc} after {self.retry.attempts} tries") from None
        except httpx.TransportError as exc:
            raise DRApiUnavailable(
                f"{where}: {_describe(exc)} after {self.retry.attempts} tries"
            ) from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code != 200:
            raise DRApiRefused(f"{where}: HTTP {response.status_code}{_dr_message(response)}")
        try:
            return load_json(response.content)
        except (ValueError, RecursionError):
            raise DRApiMalformed(f"{where}: the answer is not JSON") from None

    def _get(self, path: str, params: list[tuple[str, str]], where: str) -> httpx.Response:
        self.calls += 1
        response = self._http.get(path, params=tuple(params))
        if response.status_code == 429 or response.status_code >= 500:
            wait = retry_after_seconds(response.headers.get("Retry-After"), datetime.now(UTC))
            raise _Retryable(f"HTTP {response.status_code}", wait)
        return response

    def _worth_retrying(self, exc: BaseException) -> bool:
        if isinstance(exc, _Retryable):
            return exc.retry_after is None or exc.retry_after <= self.retry.max_retry_after_s
        return isinstance(exc, httpx.TransportError)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        backoff = wait_random_exponential(
            multiplier=self.retry.backoff_s, max=self.retry.backoff_max_s
        )
        return float(backoff(state))

    def _log_retry(self, state: RetryCallState, where: str) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "dr_api.retry",
            extra={
                "call": where,
                "attempt": state.attempt_number,
                "error": _describe(exc) if exc else "",
                "wait_s": round(wait, 3),
            },
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _Retryable):
        return str(exc)
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return type(exc).__name__


def _dr_message(response: httpx.Response) -> str:
    """DR's own reason for a refusal (`errors[0].message`), if it gave one."""
    try:
        errors = response.json().get("errors")
        message = errors[0].get("message") if isinstance(errors, list) and errors else None
    except (ValueError, AttributeError):
        return ""
    return f": {str(message)[:200]}" if message else ""

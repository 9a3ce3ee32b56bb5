"""The read API (`/orders/{id}`, `/orders?upstreamId=`, `/invoices/{id}`, `/events/{id}`,
`/events`, `/changes`) and readiness: bearer token, read-only queries."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ingest.responses import error, ok
from models import feed, ledger, views
from models.db import make_engine
from models.outcome import Outcome
from models.payloads import could_be_stored_id
from models.settings import Settings
from worker.queue.publish import BrokerUnavailable, EventQueue

MAX_LIMIT = 1000

T = TypeVar("T")


class ReadDatabase:
    """The ingest's read-only use of Postgres, connected on first use: the webhook route
    never needs it, so an ingest starts and queues events while Postgres is down."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: Engine | None = None

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self._url, pool_size=4, read_only=True)
        return self._engine

    def query(self, fn: Callable[[Connection], T]) -> T:
        """`fn` on a connection of its own (blocking)."""
        with self.engine().connect() as conn:
            return fn(conn)

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _engine(request: Request) -> Engine:
    db: ReadDatabase = request.app.state.db
    return db.engine()


def _authorized(request: Request) -> bool:
    settings: Settings = request.app.state.settings
    if settings.api_token is None:
        return False
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.api_token.get_secret_value()
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), expected.encode()
    )


async def query(request: Request, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(conn, *args, **kwargs)` on a connection of the app's read database, in a thread
    (the read routes and the console)."""

    def run() -> Any:
        with _engine(request).connect() as conn:
            return fn(conn, *args, **kwargs)

    return await run_in_threadpool(run)


def _database_error(exc: SQLAlchemyError) -> Response:
    """503 when the database is out of reach; 400 when it refused what was asked (a value
    it cannot take), which no retry would change."""
    if isinstance(exc, DataError):
        return error(400, "invalid_request", "the database refused a value of the request")
    return error(503, "database_unavailable", "the database is unreachable")


def _unauthorized() -> Response:
    return error(
        401,
        "unauthorized",
        "a valid bearer token is required",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def get_order(request: Request) -> Response:
    """`GET /orders/{orderId}`: the order's refund summary."""
    return await _summary(request, request.path_params["order_id"], views.order_summary, "order")


async def get_invoice(request: Request) -> Response:
    """`GET /invoices/{invoiceId}`: the refund summary of an invoice's refunds."""
    invoice_id = request.path_params["invoice_id"]
    return await _summary(request, invoice_id, views.invoice_summary, "invoice")


async def _summary(
    request: Request,
    key: str,
    view: Callable[[Connection, str], dict[str, Any] | None],
    kind: str,
) -> Response:
    if not _authorized(request):
        return _unauthorized()
    if not could_be_stored_id(key):
        return error(404, "not_found", f"unknown {kind}")
    try:
        summary = await query(request, view, key)
    except SQLAlchemyError as exc:
        return _database_error(exc)
    if summary is None:
        return error(404, "not_found", f"unknown {kind}")
    return ok(summary)


async def find_orders(request: Request) -> Response:
    """`GET /orders?upstreamId=X`: the summaries of the orders with the merchant's id X."""
    if not _authorized(request):
        return _unauthorized()
    upstream_id = request.query_params.get("upstreamId")
    if not upstream_id:
        return error(400, "invalid_request", "upstreamId is required")
    if not could_be_stored_id(upstream_id):
        return ok([])
    try:
        return ok(await query(request, views.upstream_summaries, upstream_id))
    except SQLAlchemyError as exc:
        return _database_error(exc)


async def get_event(request: Request) -> Response:
    """`GET /events/{eventId}`: the event's processing record."""
    if not _authorized(request):
        return _unauthorized()
    event_id = request.path_params["event_id"]
    if not could_be_stored_id(event_id):
        return error(404, "not_found", "unknown event")
    try:
        record = await query(request, views.event_record, event_id)
    except SQLAlchemyError as exc:
        return _database_error(exc)
    if record is None:
        return error(404, "not_found", "unknown event")
    return ok(record)


async def list_events(request: Request) -> Response:
    """`GET /events?outcome=failed&orderId=X&limit=N`: processing records, newest first."""
    if not _authorized(request):
        return _unauthorized()
    outcome = request.query_params.get("outcome")
    if outcome is not None and outcome not in {o.value for o in Outcome}:
        allowed = ", ".join(o.value for o in Outcome)
        return error(400, "invalid_outcome", f"outcome must be one of {allowed}")
    limit = _limit(request)
    if limit is None:
        return _invalid_limit()
    order_id = request.query_params.get("orderId")
    if order_id is not None and not could_be_stored_id(order_id):
        return ok([])  # no event names such an order
    try:
        records = await query(
            request, views.event_records, outcome=outcome, limit=limit, order_id=order_id
        )
    except SQLAlchemyError as exc:
        return _database_error(exc)
    return ok(records)


def _limit(request: Request) -> int | None:
    """The `limit` query parameter (default 100), or None when it is not 1 to MAX_LIMIT."""
    raw_limit = request.query_params.get("limit", "100")
    # The length first: int() refuses strings of thousands of digits with a ValueError.
    valid = len(raw_limit) <= 4 and raw_limit.isascii() and raw_limit.isdecimal()
    if not valid or not 1 <= int(raw_limit) <= MAX_LIMIT:
        return None
    return int(raw_limit)


def _invalid_limit() -> Response:
    return error(400, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}")


async def list_changes(request: Request) -> Response:
    """`GET /changes?after=C&limit=N`: the change feed from cursor C, gap-free (models.feed)."""
    if not _authorized(request):
        return _unauthorized()
    limit = _limit(request)
    if limit is None:
        return _invalid_limit()
    raw_after = request.query_params.get("after")
    try:
        after = feed.Cursor.parse(raw_after) if raw_after else None
        page = await query(request, feed.read, after, limit)
    except feed.InvalidCursor as exc:
        return error(400, "invalid_cursor", str(exc))
    except feed.CursorExpired as exc:
        return error(410, "cursor_expired", str(exc))
    except SQLAlchemyError as exc:
        return _database_error(exc)
    return Response(page.encoded(), media_type="application/json")


async def ready(request: Request) -> Response:
    """`GET /readyz`: 200 when Redis and Postgres answer, else 503 naming the one that failed."""
    publisher: EventQueue = request.app.state.publisher
    failed = []
    try:
        await publisher.ping()
    except BrokerUnavailable:
        failed.append("redis")
    try:
        await query(request, ledger.ping)
    except SQLAlchemyError:
        failed.append("postgres")
    if failed:
        return error(503, "not_ready", f"unreachable: {', '.join(failed)}")
    return ok({"status": "ready"})

"""The ASGI app: `create_app(settings)`, and `ingest.app:app` built from the environment
(`uvicorn ingest.app:app`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest import reads, webhook
from ingest.console import console_app
from ingest.metrics import JOURNAL_UNREADABLE, StateCollector, exposition, journal_full
from ingest.reads import ReadDatabase
from ingest.responses import error, ok
from models import logs, trust
from models.settings import Settings, load_or_exit
from worker.queue.connect import refuse_untrusted_redis
from worker.queue.keys import QueueKeys
from worker.queue.publish import BrokerUnavailable, EventQueue, event_queue, signing_key

log = logging.getLogger("refundsync.ingest")


async def healthz(_: Request) -> Response:
    """`GET /healthz`: the process is up."""
    return ok({"status": "ok"})


async def metrics(request: Request) -> Response:
    """`GET /metrics`: Prometheus text format."""
    publisher: EventQueue = request.app.state.publisher
    try:
        depth = await publisher.queue_depth()
        journal = await publisher.journal_state()
    except BrokerUnavailable:
        depth, journal = -1, JOURNAL_UNREADABLE
    body = await run_in_threadpool(exposition, request.app.state.metrics, depth, journal)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error(exc.status_code, code, str(exc.detail), headers=exc.headers)


WEBHOOK_PATH = "/webhooks/digital-river"


class _WebhookFirst:
    """Sends webhook POSTs straight to their endpoint, everything else through Starlette.

    The webhook is the hot path; Starlette's middleware and router would cost more per
    request than verifying and queueing the event.
    """

    def __init__(self, app: Starlette, endpoint: webhook.WebhookEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: Settings) -> ASGIApp:
    """The app for `settings`; the webhook route needs a secret and a broker URL."""
    read_db = ReadDatabase(settings.database_url or "")
    keys = QueueKeys(lambda: read_db.query(trust.load_keys))
    publisher = event_queue(settings, keys, on_unjournaled=journal_full)
    endpoint = webhook.WebhookEndpoint(settings, publisher)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info(
            "ingest.start",
            extra={
                "secrets": len(settings.dr_webhook_secrets),
                "live_mode": settings.dr_live_mode,
                "read_api": "on" if settings.api_token else "off",
            },
        )
        try:
            # Read now rather than by the first webhook; if the database is not there yet,
            # the first webhook tries again (and is answered 503 until it can).
            await signing_key(keys)
        except BrokerUnavailable as exc:
            log.warning("ingest.queue_key_unavailable", extra={"error": str(exc)})
        # Start-up objects are never collected: frozen, full collections skip them instead
        # of pausing every request for tens of milliseconds to walk them.
        gc.freeze()
        yield
        await app.state.publisher.close()
        app.state.db.dispose()

    console = console_app(settings, read_db, publisher, keys)
    app = Starlette(
        routes=[
            *([Mount("/console", app=console)] if console is not None else []),
            Route(WEBHOOK_PATH, endpoint, methods=["POST"]),
            Route("/orders", reads.find_orders, methods=["GET"]),
            Route("/orders/{order_id:path}", reads.get_order, methods=["GET"]),
            Route("/invoices/{invoice_id:path}", reads.get_invoice, methods=["GET"]),
            Route("/events/{event_id:path}", reads.get_event, methods=["GET"]),
            Route("/events", reads.list_events, methods=["GET"]),
            Route("/changes", reads.list_changes, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", reads.ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.publisher = publisher
    app.state.db = read_db
    app.state.metrics = StateCollector(app.state.db.engine)
    return _WebhookFirst(app, endpoint)


def __getattr__(name: str) -> ASGIApp:
    """`ingest.app:app` (what `uvicorn ingest.app:app` serves), built from the environment
    when first asked for: importing this module configures nothing and reads no settings."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    logs.configure()
    settings = load_or_exit("REDIS_URL", "DATABASE_URL", "DR_WEBHOOK_SECRETS")
    refuse_untrusted_redis(settings)
    built = create_app(settings)
    # Built once: from now on `app` is an attribute like any other.
    globals()["app"] = built
    return built

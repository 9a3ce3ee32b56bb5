"""The ASGI app (`uvicorn ingest.app:app`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest import reads, webhook
from ingest.publish import Publisher
from ingest.responses import error, ok
from models.settings import Settings, load_or_exit

log = logging.getLogger("refundsync.ingest")


async def healthz(_: Request) -> Response:
    """`GET /healthz`: the process is up."""
    return ok({"status": "ok"})


async def metrics(_: Request) -> Response:
    """`GET /metrics`: Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error(exc.status_code, code, str(exc.detail), headers=exc.headers)


def create_app(settings: Settings) -> Starlette:
    """The app for `settings`; the webhook route needs a secret and a broker URL."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info(
            "ingest.start secrets=%d live_mode=%s read_api=%s",
            len(settings.dr_webhook_secrets),
            settings.dr_live_mode,
            "on" if settings.api_token else "off",
        )
        yield
        app.state.publisher.close()
        if app.state.engine is not None:
            app.state.engine.dispose()

    app = Starlette(
        routes=[
            Route("/webhooks/digital-river", webhook.receive, methods=["POST"]),
            Route("/orders/{order_id:path}", reads.get_order, methods=["GET"]),
            Route("/events/{event_id:path}", reads.get_event, methods=["GET"]),
            Route("/events", reads.list_events, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", reads.ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.publisher = Publisher(settings.redis_url or "", settings.queue)
    app.state.engine = None
    return app


app = create_app(load_or_exit("REDIS_URL", "DATABASE_URL", "DR_WEBHOOK_SECRETS"))

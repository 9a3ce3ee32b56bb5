"""`POST /webhooks/digital-river`: size limit, signature, envelope check, queue, 202.

It never touches Postgres and never parses more than the envelope's id and type.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ingest import metrics
from ingest.publish import BrokerUnavailable, Publisher
from ingest.responses import error, ok
from ingest.signature import HEADER, SignatureError, verify
from models.payloads import load_json
from models.settings import Settings

log = logging.getLogger("refundsync.ingest")

# How long DR (or any sender) should wait before retrying when the broker is down.
RETRY_AFTER_S = "30"


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing as soon as it passes `limit` bytes (never buffering more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


# Characters an event id or type must not hold: control characters (Postgres text cannot
# store NUL; the others would forge log lines) and unpaired surrogates (not encodable as
# UTF-8, so neither storable nor echoable in the 202 answer). Queued anyway, such an event
# could never be recorded by a worker: it would vanish after a 202.
_UNUSABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _text(value: object) -> str | None:
    if (
        isinstance(value, str)
        and value.strip()
        and len(value) <= 255
        and not _UNUSABLE.search(value)
    ):
        return value
    return None


async def receive(request: Request) -> Response:
    """Verify and queue one DR event."""
    started = time.perf_counter()
    response = await _receive(request)
    metrics.WEBHOOKS.labels(code=str(response.status_code)).inc()
    metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
    return response


async def _receive(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    publisher: Publisher = request.app.state.publisher
    if not _is_json(request.headers.get("content-type")):
        return error(415, "unsupported_media_type", "Content-Type must be application/json")
    try:
        body = await _read_body(request, settings.max_body_bytes)
    except _TooLarge:
        return error(413, "payload_too_large", f"body exceeds {settings.max_body_bytes} bytes")
    except ClientDisconnect:
        return error(400, "client_disconnected", "the body did not arrive in full")
    try:
        verify(
            request.headers.get(HEADER),
            body,
            settings.secrets(),
            tolerance_s=settings.dr_signature_tolerance_seconds,
        )
    except SignatureError as exc:
        metrics.SIGNATURE_FAILURES.inc()
        log.info("webhook.unauthorized", extra={"reason": str(exc)})
        return error(401, "invalid_signature", str(exc))
    try:
        text = body.decode("utf-8")
        event = load_json(text, exact=False)
    except (ValueError, RecursionError):
        return error(400, "invalid_json", "body is not valid UTF-8 JSON")
    if not isinstance(event, dict):
        return error(400, "invalid_event", "body must be a JSON object")
    event_id, event_type = _text(event.get("id")), _text(event.get("type"))
    if event_id is None or event_type is None:
        return error(
            400,
            "invalid_event",
            "event needs string id and type (1-255 characters, no control characters)",
        )
    received_at = datetime.now(UTC).isoformat()
    try:
        await publisher.publish(text, event_id, event_type, received_at)
    except BrokerUnavailable as exc:
        log.warning("webhook.broker_unavailable", extra={"event_id": event_id, "error": str(exc)})
        return error(
            503,
            "broker_unavailable",
            "the queue is unreachable; retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    # Debug only: at webhook rates an info line per event costs more than the publish; the
    # worker logs each event's outcome.
    log.debug("webhook.queued", extra={"event_id": event_id, "type": event_type})
    return ok({"id": event_id, "status": "queued"}, status=202)

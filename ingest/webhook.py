"""`POST /webhooks/digital-river`: size limit, signature, envelope check, queue, 202.

It never touches Postgres and never parses more than the envelope's id and type.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from starlette.types import Receive, Scope, Send

from ingest import metrics
from models.envelope import UnusableEnvelope, header_of
from models.payloads import load_json
from models.settings import Settings
from models.signature import HEADER, SignatureError, verify
from worker.queue.publish import BrokerUnavailable, EventQueue

log = logging.getLogger("refundsync.ingest")

# How long DR (or any sender) should wait before retrying when the broker is down.
RETRY_AFTER_S = "30"


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


Headers = dict[bytes, bytes]


async def _read_body(headers: Headers, receive: Receive, limit: int) -> bytes:
    """The body, refusing as soon as it passes `limit` bytes (never buffering more)."""
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_json(content_type: bytes) -> bool:
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    )


@dataclass(frozen=True)
class Answer:
    """What the webhook answers: a status and a JSON body."""

    status: int
    body: dict[str, str]
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _error(
    status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Answer:
    return Answer(status, {"error": code, "message": message}, headers)


class WebhookEndpoint:
    """`POST /webhooks/digital-river` as a plain ASGI app.

    Starlette's request objects, router and middleware cost more per request than the
    webhook's own work, so this endpoint reads the ASGI messages itself.
    """

    def __init__(self, settings: Settings, publisher: EventQueue) -> None:
        self._settings = settings
        self._publisher = publisher
        self._secrets = settings.secrets()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = {name.lower(): value for name, value in scope["headers"]}
        answer = await self._answer(headers, receive)
        body = orjson.dumps(answer.body)
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                # With a length the answer is not sent chunked: less to frame and parse.
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *answer.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        metrics.WEBHOOKS.labels(code=str(answer.status)).inc()
        metrics.INGEST_SECONDS.observe(time.perf_counter() - started)

    async def _answer(self, headers: Headers, receive: Receive) -> Answer:
        settings = self._settings
        if not _is_json(headers.get(b"content-type", b"")):
            return _error(415, "unsupported_media_type", "Content-Type must be application/json")
        try:
            body = await _read_body(headers, receive, settings.max_body_bytes)
        except _TooLarge:
            return _error(413, "payload_too_large", f"body exceeds {settings.max_body_bytes} bytes")
        except _Disconnected:
            return _error(400, "client_disconnected", "the body did not arrive in full")
        try:
            verify(
                headers.get(HEADER.lower().encode(), b"").decode("latin-1") or None,
                body,
                self._secrets,
                tolerance_s=settings.dr_signature_tolerance_seconds,
            )
        except SignatureError as exc:
            metrics.SIGNATURE_FAILURES.inc()
            log.info("webhook.unauthorized", extra={"reason": str(exc)})
            return _error(401, "invalid_signature", str(exc))
        try:
            text = body.decode("utf-8")
            event = load_json(text, exact=False)
        except (ValueError, RecursionError):
            return _error(400, "invalid_json", "body is not valid UTF-8 JSON")
        try:
            header = header_of(event)
        except UnusableEnvelope as exc:
            return _error(400, "invalid_event", f"{exc} (1-255 characters, no control characters)")
        event_id, event_type = header.id, header.type
        received_at = datetime.now(UTC).isoformat()
        try:
            await self._publisher.publish(text, event_id, event_type, received_at)
        except BrokerUnavailable as exc:
            log.warning(
                "webhook.broker_unavailable", extra={"event_id": event_id, "error": str(exc)}
            )
            return _error(
                503,
                "broker_unavailable",
                "the queue is unreachable; retry later",
                headers=((b"retry-after", RETRY_AFTER_S.encode()),),
            )
        # Debug only: at webhook rates an info line per event costs more than the publish;
        # the worker logs each event's outcome.
        log.debug("webhook.queued", extra={"event_id": event_id, "type": event_type})
        return Answer(202, {"id": event_id, "status": "queued"})

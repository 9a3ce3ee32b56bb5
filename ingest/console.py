"""The operator console under `/console`: search an order, read its life as a timeline, list
failed events, see the service's health. Off unless `REFUNDSYNC_CONSOLE_PASSWORD` is set.

Server-rendered (Jinja2 templates, no script). One shared password; a login gives a
session in a cookie signed with a key derived from that password (so changing the password
ends every session), `HttpOnly`, `Secure`, `SameSite=Strict`, scoped to `/console`, that
ends after SESSION_S idle or SESSION_S after the login, whichever comes first. The key
also depends on the newest queue key (a random secret in Postgres), so a cookie cannot be
used to try passwords offline. Every form
carries the session's CSRF token, and a POST without it is refused with 403. Wrong
passwords are slowed down per client address: after FREE_FAILURES, each further attempt is
refused (429) for a time that doubles, up to LOCKOUT_MAX_S.

No page shows a payload: events are shown by id, type, times, outcome and error. A
failed event can be tried in a transaction that is rolled back (the would-be change) and
replayed, alone or with every failed event of its type, as `refundsync events replay`
does; a progress page follows the replayed events until they finish.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import itsdangerous
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest.reads import query
from models import console, ledger
from models.db import transaction
from models.errors import RefundSyncError
from models.settings import Settings
from models.views import event_records
from worker import processing
from worker.queue.connect import workers_answering
from worker.queue.keys import QueueKeys
from worker.queue.publish import BrokerUnavailable, EventQueue, signing_key

# How long a session lasts, idle or not.
SESSION_S = 8 * 3600
# Wrong passwords a client address may try before it is slowed down.
FREE_FAILURES = 5
# The longest a client address waits before its next attempt.
LOCKOUT_MAX_S = 300
# Client addresses remembered before those no longer blocked are forgotten.
THROTTLE_ADDRESSES = 10_000
COOKIE = "refundsync_console"
FAILED_LIMIT = 200
# How long the health page waits for workers to answer a ping.
PING_S = 1.0
# Events one "replay all failed of this type" queues at most.
REPLAY_LIMIT = 1000

_templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


@dataclass
class _Failures:
    count: int = 0
    blocked_until: float = 0.0


class Throttle:
    """Wrong-password attempts per client address, in this process."""

    def __init__(self) -> None:
        self._seen: dict[str, _Failures] = {}

    def wait_s(self, client: str) -> float:
        """Seconds before `client` may try again (0: now)."""
        failures = self._seen.get(client)
        return 0.0 if failures is None else max(0.0, failures.blocked_until - time.monotonic())

    def failed(self, client: str) -> None:
        if len(self._seen) >= THROTTLE_ADDRESSES and client not in self._seen:
            # Many addresses guessing: forget those no longer waiting, so memory stays
            # bounded; the ones still blocked stay blocked.
            now = time.monotonic()
            self._seen = {k: v for k, v in self._seen.items() if v.blocked_until > now}
        failures = self._seen.setdefault(client, _Failures())
        failures.count += 1
        if failures.count > FREE_FAILURES:
            wait = min(2.0 ** (failures.count - FREE_FAILURES), LOCKOUT_MAX_S)
            failures.blocked_until = time.monotonic() + wait

    def succeeded(self, client: str) -> None:
        self._seen.pop(client, None)


def session_key(queue_key: bytes, password: str) -> str:
    """The key the session cookie is signed with: derived from the newest queue key, a
    random secret kept in Postgres (so a cookie, which anyone gets from the login form,
    cannot be used to try passwords offline), and from the password (so changing the
    password signs everyone out)."""
    message = b"refundsync console session:" + password.encode()
    return hmac.new(queue_key, message, hashlib.sha256).hexdigest()


class _Sessions(SessionMiddleware):
    """Starlette's signed-cookie sessions, with the key read from Postgres on the first
    request (the ingest starts while Postgres is down; until the key can be read, the
    console answers 503)."""

    def __init__(self, app: ASGIApp, keys: QueueKeys, password: str, **options: Any) -> None:
        # A random key until the real one is read: nothing is signed or checked with it.
        super().__init__(app, secret_key=secrets.token_hex(32), **options)
        self._keys = keys
        self._password = password
        self._ready = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._ready and scope["type"] == "http":
            try:
                key = await signing_key(self._keys)
            except BrokerUnavailable:
                response = PlainTextResponse("the console's key cannot be read yet", 503)
                await response(scope, receive, send)
                return
            self.signer = itsdangerous.TimestampSigner(session_key(key, self._password))
            self._ready = True
        await super().__call__(scope, receive, send)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _signed_in(request: Request) -> bool:
    session = request.session
    login_at = session.get("login_at")
    if not session.get("operator") or not isinstance(login_at, (int, float)):
        return False
    if time.time() - login_at > SESSION_S:
        session.clear()
        return False
    return True


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


async def _form_with_csrf(request: Request) -> dict[str, Any] | None:
    """The POSTed form, or None if its CSRF token is not the session's."""
    form = await request.form()
    given = form.get("csrf")
    expected = request.session.get("csrf")
    if not isinstance(given, str) or not isinstance(expected, str):
        return None
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return None
    return dict(form)


def _login_redirect() -> Response:
    return RedirectResponse("/console/login", status_code=303)


def _page(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    context.update(csrf=_csrf(request), signed_in=_signed_in(request))
    response = _templates.TemplateResponse(request, template, context, status_code=status_code)
    # Pages carry order data: never cached, never framed.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; style-src 'self' 'unsafe-inline'"
    )
    return response


def _forbidden(request: Request) -> Response:
    return _page(
        request, "console/error.html", 403, message="The form's CSRF token is missing or wrong."
    )


async def login_form(request: Request) -> Response:
    if _signed_in(request):
        return RedirectResponse("/console/", status_code=303)
    return _page(request, "console/login.html")


def _slowed(request: Request, wait: float) -> Response:
    response = _page(
        request, "console/login.html", 429, error=f"Too many wrong passwords: wait {wait:.0f} s."
    )
    response.headers["Retry-After"] = str(int(wait) + 1)
    return response


async def login(request: Request) -> Response:
    throttle: Throttle = request.app.state.throttle
    client = _client(request)
    if (wait := throttle.wait_s(client)) > 0:
        return _slowed(request, wait)
    form = await _form_with_csrf(request)
    if form is None:
        return _forbidden(request)
    # Again, now that the body is in: requests that waited together on their bodies must
    # not all pass the check above. Nothing is awaited from here to the count below.
    if (wait := throttle.wait_s(client)) > 0:
        return _slowed(request, wait)
    expected: str = request.app.state.password
    given = str(form.get("password", ""))
    if not hmac.compare_digest(given.encode(), expected.encode()):
        throttle.failed(client)
        return _page(request, "console/login.html", 401, error="Wrong password.")
    throttle.succeeded(client)
    request.session.clear()
    # A new token at login: one seen before it (on the login form) is worth nothing now.
    request.session.update(operator=True, login_at=time.time(), csrf=secrets.token_urlsafe(32))
    return RedirectResponse("/console/", status_code=303)


async def logout(request: Request) -> Response:
    if not _signed_in(request):
        return _login_redirect()
    if await _form_with_csrf(request) is None:
        return _forbidden(request)
    request.session.clear()
    return _login_redirect()


async def search_page(request: Request) -> Response:
    if not _signed_in(request):
        return _login_redirect()
    term = request.query_params.get("q", "").strip()[:200]
    hits = await query(request, console.search, term) if term else []
    if len(hits) == 1:
        return RedirectResponse(
            f"/console/orders/{quote(hits[0].order_id, safe='')}", status_code=303
        )
    return _page(request, "console/search.html", term=term, hits=hits)


async def order_page(request: Request) -> Response:
    if not _signed_in(request):
        return _login_redirect()
    order_id = request.path_params["order_id"]
    found = await query(request, console.order_page, order_id)
    if found is None:
        return _page(request, "console/error.html", 404, message="No order with this id.")
    summary, steps = found
    return _page(request, "console/order.html", summary=summary, steps=steps)


async def failed_page(request: Request) -> Response:
    if not _signed_in(request):
        return _login_redirect()
    events = await query(request, event_records, outcome="failed", limit=FAILED_LIMIT)
    types = sorted({event["type"] for event in events})
    return _page(request, "console/failed.html", events=events, types=types)


async def health_page(request: Request) -> Response:
    if not _signed_in(request):
        return _login_redirect()
    publisher: EventQueue = request.app.state.publisher
    try:
        depth: int | None = await publisher.queue_depth()
        journal = await publisher.journal_state()
    except BrokerUnavailable:
        depth, journal = None, None
    figures = await query(request, console.health, datetime.now(UTC))
    settings: Settings = request.app.state.settings
    workers: list[str] | None = None
    if depth is not None and journal is not None:
        # None in the standalone mode (no journal there, and no remote control either).
        try:
            workers = await run_in_threadpool(workers_answering, settings.broker(), PING_S)
        except (KombuError, RedisError, OSError):
            workers = None
    return _page(
        request,
        "console/health.html",
        depth=depth,
        journal=journal,
        figures=figures,
        workers=workers,
    )


async def _replay(request: Request, events: list[Any]) -> Response:
    """Make each stored event unfinished and publish it again, as `refundsync events
    replay` does, then show the replay's progress. Requeued first: if publishing fails,
    the sweeper finds the event unfinished and publishes it later. If Postgres or Redis
    fails part-way, the page says how far it got and links the progress of those queued."""
    settings: Settings = request.app.state.settings
    publisher: EventQueue = request.app.state.publisher
    queued: list[str] = []
    for event in events:
        if event.unstorable:
            continue

        def requeue(event_id: str = event.id) -> None:
            with transaction(processing.engine(settings)) as conn:
                ledger.requeue(conn, event_id)

        try:
            await run_in_threadpool(requeue)
            await publisher.publish(
                event.payload, event.id, event.type, event.received_at.isoformat(), "replay"
            )
        except (SQLAlchemyError, RefundSyncError) as exc:
            return _page(
                request,
                "console/error.html",
                503,
                message=f"Stopped after {len(queued)} of {len(events)} events: {_why(exc)}.",
                link=f"/console/progress?{_ids_query(queued)}" if queued else None,
            )
        queued.append(event.id)
    return RedirectResponse(f"/console/progress?{_ids_query(queued)}", status_code=303)


def _why(exc: Exception) -> str:
    if isinstance(exc, BrokerUnavailable):
        return "Redis is unreachable"
    if isinstance(exc, SQLAlchemyError):
        return f"the database failed ({type(exc).__name__})"
    return str(exc)


async def _unavailable(request: Request, exc: Exception) -> Response:
    """A page whose reads or dry run met a database or broker failure: 503, not a crash."""
    return _page(request, "console/error.html", 503, message=f"Not now: {_why(exc)}.")


async def dry_run(request: Request) -> Response:
    """What replaying one stored event would change now, in a transaction rolled back."""
    if not _signed_in(request):
        return _login_redirect()
    if await _form_with_csrf(request) is None:
        return _forbidden(request)
    event_id = request.path_params["event_id"]
    found = await query(request, ledger.stored_events, [event_id])
    if not found:
        return _page(request, "console/error.html", 404, message="No event with this id.")
    event = found[0]
    if event.unstorable:
        result = None
    else:
        result = await run_in_threadpool(processing.preview, request.app.state.settings, event)
    return _page(request, "console/dry_run.html", event=event, result=result)


async def replay_one(request: Request) -> Response:
    if not _signed_in(request):
        return _login_redirect()
    if await _form_with_csrf(request) is None:
        return _forbidden(request)
    found = await query(request, ledger.stored_events, [request.path_params["event_id"]])
    if not found:
        return _page(request, "console/error.html", 404, message="No event with this id.")
    return await _replay(request, found)


async def replay_type(request: Request) -> Response:
    """Replay every failed event of one type (up to REPLAY_LIMIT), oldest first."""
    if not _signed_in(request):
        return _login_redirect()
    form = await _form_with_csrf(request)
    if form is None:
        return _forbidden(request)
    event_type = str(form.get("type", ""))[:255]
    found = await query(request, ledger.failed_events, REPLAY_LIMIT, event_type)
    return await _replay(request, found)


def _ids_query(event_ids: list[str]) -> str:
    return urlencode([("id", event_id) for event_id in event_ids])


async def progress(request: Request) -> Response:
    """How far the replayed events have got: the page reloads itself until all finished."""
    if not _signed_in(request):
        return _login_redirect()
    event_ids = request.query_params.getlist("id")[:REPLAY_LIMIT]
    found = await query(request, ledger.outcomes_of, event_ids) if event_ids else {}
    outcomes = {event_id: outcome.value for event_id, (outcome, _) in found.items()}
    finished = sum(1 for outcome in outcomes.values() if outcome != "queued")
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return _page(
        request,
        "console/progress.html",
        total=len(event_ids),
        finished=finished,
        counts=sorted(counts.items()),
        outcomes=outcomes,
        event_ids=event_ids,
    )


def console_app(
    settings: Settings, db: Any, publisher: EventQueue, keys: QueueKeys
) -> ASGIApp | None:
    """The console's app (mounted at /console), or None when no password is set."""
    if settings.console_password is None:
        return None
    password = settings.console_password.get_secret_value()
    app = Starlette(
        routes=[
            Route("/", search_page, methods=["GET"]),
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/orders/{order_id:path}", order_page, methods=["GET"]),
            Route("/failed", failed_page, methods=["GET"]),
            Route("/health", health_page, methods=["GET"]),
            Route("/events/{event_id:path}/dry-run", dry_run, methods=["POST"]),
            Route("/events/{event_id:path}/replay", replay_one, methods=["POST"]),
            Route("/failed/replay", replay_type, methods=["POST"]),
            Route("/progress", progress, methods=["GET"]),
        ],
        exception_handlers={SQLAlchemyError: _unavailable, RefundSyncError: _unavailable},
    )
    app.state.password = password
    app.state.settings = settings
    app.state.throttle = Throttle()
    app.state.db = db
    app.state.publisher = publisher
    return _Sessions(
        app,
        keys,
        password,
        session_cookie=COOKIE,
        max_age=SESSION_S,
        path="/console",
        same_site="strict",
        https_only=True,
    )

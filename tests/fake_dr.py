"""A fake of DR's REST API for reconciliation tests: a real HTTP server on loopback.

It serves `GET /events` the way DR documents it (`type`: a name or a `*` group; `types`:
repeated names; `createdTime[gte|gt|lt|lte]`, `limit` 1-100, `startingAfter`,
`{"hasMore", "data"}`; newest first, as Stripe-style APIs sort), `GET /orders/{id}` and
`GET /refunds/{id}`, checks the bearer key, and can be scripted to answer the next requests
with 429 + `Retry-After`, 500, a slow answer or a malformed page.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

API_KEY = "sk_test_fake_reconcile_key"


@dataclass(frozen=True)
class Answer:
    """A scripted answer for one request. `body` None: the normal answer, after `delay_s`."""

    status: int = 200
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def too_many(retry_after: str) -> Answer:
    return Answer(
        429,
        b'{"type":"rate_limit","errors":[{"code":"too_many_requests"}]}',
        {"Retry-After": retry_after},
    )


def server_error() -> Answer:
    return Answer(500, b'{"type":"internal_server_error","errors":[{"code":"server_error"}]}')


def slow(seconds: float) -> Answer:
    return Answer(delay_s=seconds)


def malformed(body: bytes) -> Answer:
    return Answer(200, body)


NORMAL = Answer()


@dataclass(frozen=True)
class Seen:
    """One request the fake received."""

    path: str
    query: dict[str, list[str]]
    authorization: str | None
    at: float
    status: int


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class FakeDR:
    """The fake API. Start it, point DR_API_BASE_URL at `url`, stop it afterwards."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self._events: list[dict[str, Any]] = []
        self.orders: dict[str, dict[str, Any]] = {}
        # `GET /refunds/{id}` answers these, as DR's Refunds API.
        self.refunds: dict[str, dict[str, Any]] = {}
        self.requests: list[Seen] = []
        self._script: deque[Answer] = deque()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeDR:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """The events DR has, in any order; served newest first."""
        ordered = sorted(events, key=lambda e: (_instant(e["createdTime"]), e["id"]), reverse=True)
        with self._lock:
            self._events = [dict(event) for event in ordered]

    def script(self, *answers: Answer) -> None:
        """Answer the next requests (any path) with these, in order, then normally.
        Replaces what is left of an earlier script."""
        with self._lock:
            self._script = deque(answers)

    def event_requests(self) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.requests if seen.path == "/events"]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        auth = handler.headers.get("Authorization")
        arrived = time.monotonic()
        with self._lock:
            answer = self._script.popleft() if self._script else NORMAL
        if answer.body is not None or answer.status != 200:
            status, body, headers = answer.status, answer.body or b"", dict(answer.headers)
        elif auth != f"Bearer {self.api_key}":
            status, body, headers = 401, _error("unauthorized", "invalid API key"), {}
        else:
            status, body = self._route(parts.path, query)
            headers = {}
        # Recorded on arrival, so a test sees a request whose answer is still being delayed.
        with self._lock:
            self.requests.append(Seen(parts.path, query, auth, arrived, status))
        if answer.delay_s:
            time.sleep(answer.delay_s)
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a read timeout under test)

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes]:
        if path == "/events":
            return self._list_events(query)
        if path.startswith("/refunds/"):
            refund = self.refunds.get(unquote(path.removeprefix("/refunds/")))
            if refund is None:
                return 404, _error("not_found", "refund not found")
            return 200, json.dumps(refund).encode()
        if path.startswith("/orders/"):
            order = self.orders.get(unquote(path.removeprefix("/orders/")))
            if order is None:
                return 404, _error("not_found", "order not found")
            return 200, json.dumps(order).encode()
        return 404, _error("not_found", f"no route {path}")

    def _list_events(self, query: dict[str, list[str]]) -> tuple[int, bytes]:
        if "type" in query and "types" in query:
            return 400, _error("invalid_parameter", "send type or types, not both")
        # `type`: one name, or a group with `*` as a wildcard. `types`: an array of names,
        # which the OpenAPI file's `style: form, explode: true` sends as repeated keys; a
        # comma-joined value is one (unknown) name.
        patterns = query.get("type", [])[:1] or query.get("types", [])
        if len(query.get("types", [])) >= 20:
            return 400, _error("invalid_parameter", "types takes fewer than 20 names")
        try:
            limit = int(query.get("limit", ["10"])[0])
        except ValueError:
            return 400, _error("invalid_parameter", "limit is not a number")
        if not 1 <= limit <= 100:
            return 400, _error("invalid_parameter", "limit must be 1 to 100")
        bounds = {
            op: _instant(query[f"createdTime[{op}]"][0])
            for op in ("gt", "gte", "lt", "lte")
            if f"createdTime[{op}]" in query
        }
        with self._lock:
            events = [e for e in self._events if _matches(e, patterns, bounds)]
        start = 0
        if "startingAfter" in query:
            ids = [event["id"] for event in events]
            cursor = query["startingAfter"][0]
            if cursor not in ids:
                return 400, _error("invalid_parameter", "startingAfter is not in this list")
            start = ids.index(cursor) + 1
        page = events[start : start + limit]
        body = {"hasMore": start + limit < len(events), "data": page}
        return 200, json.dumps(body).encode()


def _matches(event: Mapping[str, Any], patterns: list[str], bounds: Mapping[str, datetime]) -> bool:
    if patterns and not any(fnmatch.fnmatchcase(event["type"], p) for p in patterns):
        return False
    created = _instant(event["createdTime"])
    checks = {
        "gt": lambda b: created > b,
        "gte": lambda b: created >= b,
        "lt": lambda b: created < b,
        "lte": lambda b: created <= b,
    }
    return all(checks[op](bound) for op, bound in bounds.items())


def _error(code: str, message: str) -> bytes:
    return json.dumps({"type": code, "errors": [{"code": code, "message": message}]}).encode()

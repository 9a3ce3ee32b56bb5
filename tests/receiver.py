"""A commerce system's webhook endpoint on loopback, for the outbound webhook tests: it keeps
every request it gets, and answers as told (failing some, slowly, with a redirect, a huge
body, or not at all)."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

from tests import support

SECRET = "whsec_" + base64.b64encode(b"refundsync-test-receiver-key-32b").decode()


@dataclass
class Received:
    """One request as it arrived, and what the receiver answered."""

    at: float
    headers: dict[str, str]
    body: bytes
    status: int
    # What the Standard Webhooks reference implementation said of its signature on arrival
    # ("ok", or its error): it refuses a timestamp more than 5 minutes off.
    verified: str
    # time.time() on arrival, for latencies against other processes' clocks.
    epoch: float

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)["data"]
        return data

    @property
    def key(self) -> tuple[str, int]:
        data = self.data
        return (data["orderId"] or data["invoiceId"], data["version"])


@dataclass
class Receiver:
    """Answers 200, or 500 to `fail_rate` of requests; `mode` changes how it answers."""

    port: int = field(default_factory=support.free_port)
    fail_rate: float = 0.0
    delay_s: float = 0.0
    mode: str = "ok"  # ok, redirect, hang, huge
    secret: str = SECRET
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rng: random.Random = field(default_factory=lambda: random.Random(7))
    _release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/refundsync"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as most receivers: refundsync reuses its connection.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                receiver.answer(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self._release.clear()
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._lock:
            status = 500 if self._rng.random() < self.fail_rate else 200
        if self.mode == "redirect":
            status = 302
        headers = {k.lower(): v for k, v in handler.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers)
            verified = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded, and asserted by the tests
            verified = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.received.append(
                Received(time.monotonic(), headers, body, status, verified, time.time())
            )
        if self.mode == "hang":
            self._release.wait(120)
            return
        if self.delay_s:
            time.sleep(self.delay_s)
        payload = b"x" * (10 * 1024 * 1024) if self.mode == "huge" else b'{"ok":true}'
        handler.send_response(status)
        if status == 302:
            handler.send_header("location", "http://127.0.0.1:1/elsewhere")
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(payload)))
        handler.end_headers()
        # The client may stop reading: what it is meant to do with a huge body.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            handler.wfile.write(payload)

    def stop(self) -> None:
        """Stop listening: connections are refused until start() again (same port)."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[Received]:
        """The requests answered with a 2xx, in arrival order."""
        return [r for r in self.received if 200 <= r.status < 300]

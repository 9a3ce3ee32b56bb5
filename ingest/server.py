"""The ingest's HTTP server: uvicorn with limits on what one connection may hold.

uvicorn's httptools protocol buffers a request head of any size and waits for it, and for
a body, forever: four connections each sending an endless header took the ingest from 90
to 290 MB for as long as they stayed open, and a connection that sent half a request line
was never closed.
`LimitedHttpToolsProtocol` overrides these methods of uvicorn's `HttpToolsProtocol`
(0.55): `connection_made`, `connection_lost`, `data_received`, `on_headers_complete`,
`on_body` and `on_message_complete`, and reads its `url`, `headers`, `cycle`, `pipeline`,
`connections` and `tasks`. It adds:

- a cap on the request line and headers (431), metered before the parser sees the bytes,
  so an endless header costs at most the cap;
- a deadline for the head, from the connection's start or the next request's first byte
  (408), and one for the body, from the end of the head;
- a limit on open connections and running requests (503 with Retry-After, so DR retries).

The idle time between requests is uvicorn's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
from dataclasses import dataclass
from typing import Any, cast

import orjson
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger("refundsync.ingest")

# How long a sender refused for load should wait before trying again.
BUSY_RETRY_AFTER_S = "5"


@dataclass(frozen=True)
class Limits:
    """What one ingest process allows a connection and its requests (the defaults of
    `refundsync ingest`)."""

    # A webhook's head, signature and a load balancer's forwarding headers included, is a
    # few KiB at most; 16 KiB is Node's default cap too.
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keep_alive_timeout_s: int = 5
    limit_concurrency: int = 1000


def _answer(status: int, code: str, message: str, *extra: tuple[bytes, bytes]) -> bytes:
    """A complete HTTP/1.1 error answer in the API's JSON shape that closes the connection."""
    body = orjson.dumps({"error": code, "message": message})
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *(name + b": " + value for name, value in extra),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header cap, head and body deadlines and a
    concurrency limit (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits or Limits()
        # Between the end of one request (or the connection's start) and the end of the
        # next request's head: the head's bytes are metered against the cap.
        self._in_head = True
        self._head_bytes = 0
        self._heads_done = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # uvicorn arms no timer before a first request: a connection that sends nothing
        # would stay open.
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data:
            if self._refused or self.transport.is_closing():
                return
            if not self._in_head:
                super().data_received(data)
                return
            self._start_head_timer()
            room = self.limits.max_header_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                super().data_received(data)
                return
            # Only up to the cap goes to the parser, which would buffer an endless header.
            heads_done = self._heads_done
            self._head_bytes = self.limits.max_header_bytes
            if room:
                super().data_received(data[:room])
            if self._refused or self.transport.is_closing():
                return  # refused, or answered 400 for a malformed head, within that part
            if self._heads_done == heads_done:
                self._headers_too_large()
                return
            # The head ended within the cap: the rest is its body or the next request.
            data = data[room:]

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._heads_done += 1
        self._cancel_head_timer()
        # The head as parsed: the bytes counted above miss the start of a head that came in
        # the same read as the end of the request before it.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._headers_too_large()
            return
        limit = self.limits.limit_concurrency
        # As uvicorn's own limit counts, with this connection and this request included.
        if len(self.connections) > limit or len(self.tasks) >= limit:
            log.warning(
                "ingest.over_capacity",
                extra={
                    "connections": len(self.connections),
                    "requests": len(self.tasks),
                    "limit": limit,
                },
            )
            self._refuse_head(
                503,
                "over_capacity",
                "too many connections or requests at once; try again later",
                (b"retry-after", BUSY_RETRY_AFTER_S.encode()),
            )
            return
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_too_large(self) -> None:
        cap = self.limits.max_header_bytes
        log.warning("ingest.headers_too_large", extra={"max_header_bytes": cap})
        self._refuse_head(431, "headers_too_large", f"request line and headers exceed {cap} bytes")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        log.info(
            "ingest.header_timeout",
            extra={"timeout_s": self.limits.header_timeout_s, "received_bytes": self._head_bytes},
        )
        if self._head_bytes:
            self._refuse_head(
                408,
                "request_timeout",
                f"request line and headers not received within {self.limits.header_timeout_s} s",
            )
        else:
            # Nothing of a request arrived: nobody to answer.
            self._refused = True
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        log.info("ingest.body_timeout", extra={"timeout_s": self.limits.body_timeout_s})
        self._refused = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not self.pipeline:
            # As a lost connection would: the handler waiting for the body gets a
            # disconnect, and nothing it sends after this answer is written.
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(
                _answer(
                    408,
                    "request_timeout",
                    f"body not received within {self.limits.body_timeout_s} s",
                )
            )
        self.transport.close()

    def _refuse_head(
        self, status: int, code: str, message: str, *extra: tuple[bytes, bytes]
    ) -> None:
        """Answer a request whose head is refused, then close the connection.

        No handler runs for it. An answer still being written for an earlier request
        (pipelining) must not be interleaved with, so then the connection just closes.
        """
        self._refused = True
        self._cancel_timers()
        earlier = self.cycle
        if earlier is None or earlier.response_complete:
            self.transport.write(_answer(status, code, message, *extra))
        self.transport.close()


def serve(app: str, *, host: str, port: int, workers: int, limits: Limits) -> None:
    """Run uvicorn on `app` (an import string) with these limits, until stopped."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=workers,
        # uvicorn calls `http` with keyword arguments only; a partial (which pickles, so
        # it reaches the worker processes of `workers` > 1) carries the limits there.
        http=cast(
            "type[asyncio.Protocol]", functools.partial(LimitedHttpToolsProtocol, limits=limits)
        ),
        # No route is a websocket, and a connection handed to a websocket protocol would
        # leave these limits behind.
        ws="none",
        timeout_keep_alive=limits.keep_alive_timeout_s,
        server_header=False,
        log_level="info",
        access_log=False,
        # Keep refundsync's JSON logging instead of uvicorn's own format.
        log_config=None,
    )

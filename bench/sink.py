"""A commerce system's webhook endpoint that costs next to nothing: benchmark 6's receiver.

    python -m bench.sink PORT OUT

Answers every POST with 204 over keep-alive connections, and writes one line per request to
OUT when stopped (SIGTERM): the arrival time (time.time()) and the change's eventId. In a
process of its own, so that what it costs shows as such, and as little as possible: the
receiver of a real deployment runs on other machines.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import orjson

ANSWER = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


ARRIVALS: list[tuple[float, bytes]] = []


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(
                head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]
            )
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            ARRIVALS.append((time.time(), body))
            self.transport.write(ANSWER)  # type: ignore[attr-defined]


async def main(port: int, out: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await loop.create_server(Sink, "127.0.0.1", port)
    await stop
    server.close()
    with open(out, "w") as lines:
        for at, body in ARRIVALS:
            event_id = orjson.loads(body)["data"]["eventId"]
            lines.write(f"{at:.6f}\t{event_id}\n")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))

"""The ingest's limits on hostile connections, against a real `refundsync ingest`: heads too
large, heads and bodies that stall, idle keep-alive connections, too many connections at
once, and what an endless-header attack costs in memory."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ingest.server import Limits
from tests import deadlines, support
from worker import cli

# Short, so that waiting for them keeps the tests quick; set through the CLI's options.
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1
# How much earlier than its time a server's timer may seem to fire to a client that started
# its clock before the server armed it (the event loop's clock resolution, with slack).
EARLY_S = 0.05
MIB = 1024 * 1024


@dataclass
class Ingest:
    base: str
    port: int
    process: support.Process

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=deadlines.LOCAL_PROCESS_S)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.proc.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS"))
        return int(line.split()[1])

    def healthy(self) -> bool:
        if self.process.proc.poll() is not None:
            raise RuntimeError(f"ingest exited early:\n{self.process.log()[-4000:]}")
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def redis() -> Iterator[support.RedisServer]:
    server = support.RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def env(database: support.Database, redis: support.RedisServer) -> dict[str, str]:
    return support.service_env(database.url, redis.url)


def _start(env: dict[str, str], *options: str) -> Ingest:
    """`refundsync ingest` with these options, once it answers /healthz."""
    port = support.free_port()
    process = support.Process("ingest", ["ingest", "--port", str(port), *options], env)
    ingest = Ingest(f"http://127.0.0.1:{port}", port, process)
    try:
        support.wait_for(ingest.healthy, timeout=deadlines.PROCESS_START_S, what="ingest /healthz")
    except BaseException:
        process.stop()
        raise
    return ingest


@pytest.fixture(scope="module")
def quick(env: dict[str, str]) -> Iterator[Ingest]:
    """An ingest with short timeouts and the default header cap and concurrency limit."""
    ingest = _start(
        env,
        "--workers",
        "1",
        "--header-timeout",
        str(HEADER_TIMEOUT_S),
        "--body-timeout",
        str(BODY_TIMEOUT_S),
        "--keep-alive-timeout",
        str(KEEP_ALIVE_S),
    )
    try:
        yield ingest
    finally:
        ingest.process.stop()


def _until_closed(sock: socket.socket, started: float, within: float) -> tuple[bytes, float]:
    """What the server sent until it closed the connection, and the seconds since `started`;
    fails if it is still open `within` seconds after `started`."""
    received = b""
    try:
        while True:
            remaining = started + within - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection still open after {within} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:
        pass  # closed with data of ours unread: a close all the same
    return received, time.monotonic() - started


def _answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    """The status, headers and JSON body of one HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines)
    }
    return int(status_line.split()[1]), headers, json.loads(body)


def _signed_event() -> tuple[bytes, dict[str, str]]:
    body = support.load_fixture("dr_examples/04_refund_complete.json")
    return body, support.signed_headers(body)


def _post_head(headers: dict[str, str]) -> bytes:
    """The head of a webhook POST with these headers."""
    lines = ["POST /webhooks/digital-river HTTP/1.1", "Host: ingest"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_cli_shows_every_limit_with_its_default_and_refuses_out_of_range_values() -> None:
    defaults = {param.name: param.default for param in cli.ingest.params}
    limits = Limits()
    assert defaults["max_header_bytes"] == limits.max_header_bytes
    assert defaults["header_timeout"] == limits.header_timeout_s
    assert defaults["body_timeout"] == limits.body_timeout_s
    assert defaults["keep_alive_timeout"] == limits.keep_alive_timeout_s
    assert defaults["limit_concurrency"] == limits.limit_concurrency

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", "ingest", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    shown = run("--help").stdout
    for option, default in [
        ("--max-header-bytes", "16384"),
        ("--header-timeout", "10.0"),
        ("--body-timeout", "10.0"),
        ("--keep-alive-timeout", "5"),
        ("--limit-concurrency", "1000"),
    ]:
        assert option in shown
        assert f"default: {default}" in shown.split(option, 1)[1]
    assert run("--header-timeout", "0").returncode == 2
    assert run("--max-header-bytes", "10").returncode == 2


def test_oversized_head_gets_431_and_is_closed_then_webhooks_are_still_queued(
    quick: Ingest,
) -> None:
    with quick.connect() as sock:
        sock.sendall(_post_head({"X-A": "a" * 20_000}))
        raw, _ = _until_closed(sock, time.monotonic(), deadlines.LOCAL_PROCESS_S)
    status, headers, body = _answer(raw)
    assert status == 431
    assert headers["connection"] == "close"
    assert body["error"] == "headers_too_large"

    # A signed webhook whose head is large but under the cap is served as before.
    event, signed = _signed_event()
    response = httpx.post(
        f"{quick.base}/webhooks/digital-river",
        content=event,
        headers={**signed, "X-Padding": "a" * 10_000},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    assert support.post_event(quick.base, event).status_code == 202


def test_slowloris_head_is_answered_408_and_closed_after_the_header_timeout(
    quick: Ingest,
) -> None:
    started = time.monotonic()
    with quick.connect() as sock:
        sock.sendall(b"POST /webhooks/digital-river HTTP/1.1\r\nContent-Ty")
        raw, elapsed = _until_closed(sock, started, HEADER_TIMEOUT_S + deadlines.LOCAL_PROCESS_S)
    status, headers, body = _answer(raw)
    assert (status, headers["connection"], body["error"]) == (408, "close", "request_timeout")
    assert elapsed >= HEADER_TIMEOUT_S - EARLY_S


def test_connection_that_never_sends_a_request_is_closed_after_the_header_timeout(
    quick: Ingest,
) -> None:
    started = time.monotonic()
    with quick.connect() as sock:
        raw, elapsed = _until_closed(sock, started, HEADER_TIMEOUT_S + deadlines.LOCAL_PROCESS_S)
    assert raw == b""
    assert elapsed >= HEADER_TIMEOUT_S - EARLY_S


def test_body_that_stops_halfway_is_answered_408_and_closed_after_the_body_timeout(
    quick: Ingest,
) -> None:
    event, signed = _signed_event()
    head = _post_head({**signed, "Content-Length": str(len(event))})
    with quick.connect() as sock:
        started = time.monotonic()
        sock.sendall(head + event[: len(event) // 2])
        raw, elapsed = _until_closed(sock, started, BODY_TIMEOUT_S + deadlines.LOCAL_PROCESS_S)
    status, headers, body = _answer(raw)
    assert (status, headers["connection"], body["error"]) == (408, "close", "request_timeout")
    assert elapsed >= BODY_TIMEOUT_S - EARLY_S


def test_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    quick: Ingest,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", quick.port, timeout=10)
    try:
        for _ in range(2):  # the connection is kept for the next request
            started = time.monotonic()
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b'{"status":"ok"}')
        assert conn.sock is not None
        raw, elapsed = _until_closed(conn.sock, started, KEEP_ALIVE_S + deadlines.LOCAL_PROCESS_S)
    finally:
        conn.close()
    assert raw == b""
    assert elapsed >= KEEP_ALIVE_S - EARLY_S


def test_requests_beyond_the_concurrency_limit_get_503_with_retry_after(
    env: dict[str, str],
) -> None:
    limit = 3
    ingest = _start(env, "--limit-concurrency", str(limit), "--keep-alive-timeout", "60")
    held: list[http.client.HTTPConnection] = []
    try:
        # Connections that have had an answer are surely open on the server's side.
        for _ in range(limit):
            conn = http.client.HTTPConnection("127.0.0.1", ingest.port, timeout=10)
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b'{"status":"ok"}'
            held.append(conn)
        response = httpx.get(f"{ingest.base}/healthz", timeout=10)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"] == "over_capacity"
        for conn in held:
            conn.close()
        support.wait_for(ingest.healthy, timeout=deadlines.LOCAL_PROCESS_S, what="/healthz 200")
    finally:
        for conn in held:
            conn.close()
        ingest.process.stop()


def test_endless_header_attack_leaves_memory_within_20_mib_of_idle(
    env: dict[str, str],
) -> None:
    """Four connections each sending a head that never ends (32 MiB of one header), with the
    default limits: each is refused at the cap and closed."""
    ingest = _start(env, "--workers", "1")
    filler = b"a" * 65536
    sent = [0] * 4
    sockets: list[socket.socket] = []

    def attack(i: int) -> None:
        sock = sockets[i]
        try:
            sock.sendall(b"POST /webhooks/digital-river HTTP/1.1\r\nX-A: ")
            while sent[i] < 32 * MIB:
                sock.sendall(filler)
                sent[i] += len(filler)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused the head and closed the connection

    try:
        # Warm: the first answers load what every later request uses.
        event, _ = _signed_event()
        assert support.post_event(ingest.base, event).status_code == 202
        assert ingest.healthy()
        idle = ingest.rss_kib()
        sockets.extend(ingest.connect() for _ in range(4))
        threads = [threading.Thread(target=attack, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        peak = idle

        def sent_all() -> bool:
            nonlocal peak
            peak = max(peak, ingest.rss_kib())
            return not any(thread.is_alive() for thread in threads)

        support.wait_for(sent_all, timeout=deadlines.LOCAL_PROCESS_S, what="the attack to end")
        # Measured while the attackers' sockets are still open on their side.
        after = ingest.rss_kib()
        assert ingest.healthy()
    finally:
        for sock in sockets:
            sock.close()
        ingest.process.stop()
    print(
        f"\nINGEST_LIMITS attack=4x32MiB-header rss_idle_kib={idle} rss_peak_kib={peak}"
        f" rss_after_kib={after} sent_before_refusal_mib={[round(n / MIB, 1) for n in sent]}"
    )
    assert all(n < 32 * MIB for n in sent), "the server read a whole 32 MiB header"
    assert max(peak, after) - idle <= 20 * 1024

"""The webhook endpoint's refusals, against a real ingest process and a private Redis with
no workers, so anything queued would still be sitting in the queue."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests import deadlines, factories, support

QUEUE = "refundsync"


class BareIngest:
    def __init__(self, base: str, redis: support.RedisServer, process: support.Process) -> None:
        self.base = base
        self.redis = redis
        self.process = process

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.proc.pid}/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{self.base}/webhooks/digital-river", content=body, headers=headers, timeout=10
        )

    def queued(self) -> int:
        return int(self.redis.cli("LLEN", QUEUE))


@pytest.fixture(scope="module")
def bare(database: support.Database) -> Iterator[BareIngest]:
    redis = support.RedisServer().start()
    env = support.service_env(database.url, redis.url, REFUNDSYNC_MAX_BODY_BYTES="1048576")
    process, base = support.start_ingest(env)
    try:
        yield BareIngest(base, redis, process)
    finally:
        process.stop()
        redis.cleanup()


@pytest.fixture
def empty_queue(bare: BareIngest) -> BareIngest:
    bare.redis.cli("FLUSHALL")
    return bare


def _event() -> bytes:
    return json.dumps(factories.envelope("refund.pending", {"id": "re_1"})).encode()


def test_signed_event_is_queued_with_202(empty_queue: BareIngest) -> None:
    body = _event()
    response = empty_queue.post(body, support.signed_headers(body))
    assert response.status_code == 202
    assert response.json() == {"id": json.loads(body)["id"], "status": "queued"}
    assert empty_queue.queued() == 1


def test_webhook_answers_carry_their_length_not_chunked(empty_queue: BareIngest) -> None:
    body = _event()
    for headers in (support.signed_headers(body), support.signed_headers(body, secret="wrong")):
        response = empty_queue.post(body, headers)
        assert response.headers["content-length"] == str(len(response.content))
        assert "transfer-encoding" not in response.headers


def test_rotating_second_secret_is_accepted(empty_queue: BareIngest) -> None:
    body = _event()
    response = empty_queue.post(body, support.signed_headers(body, secret=support.OTHER_SECRET))
    assert response.status_code == 202
    assert empty_queue.queued() == 1


def test_queued_message_shows_monitors_id_and_type_not_the_payload(empty_queue: BareIngest) -> None:
    body = json.dumps(
        {
            "id": "evt-monitor",
            "type": "refund.pending",
            "createdTime": "2024-05-14T10:00:00Z",
            "data": {"object": {"id": "re_1", "email": "jane@example.com"}},
        }
    ).encode()
    assert empty_queue.post(body, support.signed_headers(body)).status_code == 202
    message = json.loads(empty_queue.redis.cli("LINDEX", QUEUE, "0"))
    assert message["headers"]["argsrepr"] == "('evt-monitor', 'refund.pending')"
    assert "jane@example.com" not in json.dumps(message["headers"])


def _tampered() -> tuple[bytes, dict[str, str]]:
    body = _event()
    return body.replace(b"refund.pending", b"refund.complete"), support.signed_headers(body)


def _wrong_secret() -> tuple[bytes, dict[str, str]]:
    body = _event()
    return body, support.signed_headers(body, secret="not-the-secret")


def _stale() -> tuple[bytes, dict[str, str]]:
    body = _event()
    return body, support.signed_headers(body, timestamp=int(time.time()) - 600)


def _future() -> tuple[bytes, dict[str, str]]:
    body = _event()
    return body, support.signed_headers(body, timestamp=int(time.time()) + 600)


def _missing_header() -> tuple[bytes, dict[str, str]]:
    return _event(), {"Content-Type": "application/json"}


def _no_signature_segment() -> tuple[bytes, dict[str, str]]:
    return _event(), {
        "Content-Type": "application/json",
        "DigitalRiver-Signature": f"t={int(time.time())}",
    }


@pytest.mark.parametrize(
    "make",
    [_tampered, _wrong_secret, _stale, _future, _missing_header, _no_signature_segment],
    ids=[
        "tampered_body",
        "wrong_secret",
        "timestamp_10_min_old",
        "timestamp_10_min_ahead",
        "missing_header",
        "timestamp_without_signature",
    ],
)
def test_bad_signature_is_401_and_nothing_is_queued(
    empty_queue: BareIngest, make: Callable[[], tuple[bytes, dict[str, str]]]
) -> None:
    body, headers = make()
    response = empty_queue.post(body, headers)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_signature"
    assert empty_queue.queued() == 0


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"type": "refund.pending"}',
        b'{"id": 5, "type": "refund.pending"}',
        b'{"id": "x"}',
        b'{"id": "", "type": "refund.pending"}',
        b"\xff\xfe{}",
        b'{"id": NaN, "type": "x"}',
        b"[" * 10_000 + b"]" * 10_000,
    ],
    ids=[
        "malformed_json",
        "not_an_object",
        "missing_id",
        "numeric_id",
        "missing_type",
        "empty_id",
        "invalid_utf8",
        "nan",
        "nested_10000_deep",
    ],
)
def test_signed_but_unusable_body_is_400_and_nothing_is_queued(
    empty_queue: BareIngest, body: bytes
) -> None:
    response = empty_queue.post(body, support.signed_headers(body))
    assert response.status_code == 400
    assert set(response.json()) == {"error", "message"}
    assert empty_queue.queued() == 0


def test_2_mib_body_is_413(empty_queue: BareIngest) -> None:
    body = b'{"id": "x", "type": "y", "pad": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = empty_queue.post(body, support.signed_headers(body))
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert empty_queue.queued() == 0


def test_streamed_100_mib_without_length_is_refused_without_buffering(
    empty_queue: BareIngest,
) -> None:
    before = empty_queue.peak_rss_kib()

    def chunks() -> Iterator[bytes]:
        chunk = b"a" * 65536
        for _ in range(1600):  # 100 MiB, chunked: no Content-Length to refuse up front
            yield chunk

    try:
        response = httpx.post(
            f"{empty_queue.base}/webhooks/digital-river",
            content=chunks(),
            headers={"Content-Type": "application/json", "DigitalRiver-Signature": "t=1,x"},
            timeout=30,
        )
        assert response.status_code == 413
    except (httpx.RemoteProtocolError, httpx.WriteError):
        pass  # the server answered 413 and closed while the client was still sending
    # The process never held more than a small part of it.
    assert empty_queue.peak_rss_kib() - before < 24 * 1024
    assert empty_queue.queued() == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_non_json_content_type_is_415(empty_queue: BareIngest, content_type: str) -> None:
    body = _event()
    headers = support.signed_headers(body)
    headers["Content-Type"] = content_type
    response = empty_queue.post(body, headers)
    assert response.status_code == 415
    assert empty_queue.queued() == 0


def test_json_with_charset_is_accepted(empty_queue: BareIngest) -> None:
    body = _event()
    headers = support.signed_headers(body)
    headers["Content-Type"] = "application/json; charset=utf-8"
    assert empty_queue.post(body, headers).status_code == 202


def test_read_api_needs_the_bearer_token(bare: BareIngest) -> None:
    for path in ("/orders/241500010336", "/events/x", "/events?outcome=failed"):
        assert httpx.get(f"{bare.base}{path}", timeout=5).status_code == 401
        wrong = httpx.get(f"{bare.base}{path}", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert wrong.status_code == 401
        assert wrong.json()["error"] == "unauthorized"


def test_read_api_answers_404_and_400_as_json(bare: BareIngest) -> None:
    auth = {"Authorization": f"Bearer {support.API_TOKEN}"}
    assert httpx.get(f"{bare.base}/orders/nope", headers=auth, timeout=5).status_code == 404
    assert (
        httpx.get(f"{bare.base}/events/nope", headers=auth, timeout=5).json()["error"]
        == "not_found"
    )
    assert (
        httpx.get(f"{bare.base}/events?outcome=bogus", headers=auth, timeout=5).status_code == 400
    )
    assert httpx.get(f"{bare.base}/events?limit=0", headers=auth, timeout=5).status_code == 400
    assert httpx.get(f"{bare.base}/nowhere", timeout=5).json()["error"] == "not_found"


def test_healthz_and_readyz(bare: BareIngest) -> None:
    assert httpx.get(f"{bare.base}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{bare.base}/readyz", timeout=5).status_code == 200


def test_broker_down_is_503_with_retry_after_and_resent_event_is_applied(
    database: support.Database,
) -> None:
    redis = support.RedisServer()
    env = support.service_env(database.url, redis.url)
    ingest, base = support.start_ingest(env)
    engine = support.engine_for(database.url)
    worker: support.Process | None = None
    try:
        event_id = str(uuid.uuid4())
        body = json.dumps(
            {
                "id": event_id,
                "type": "refund.pending",
                "createdTime": "2024-05-14T10:00:00Z",
                "data": {
                    "object": {
                        "id": f"re_{event_id}",
                        "orderId": f"ord-{event_id}",
                        "currency": "USD",
                        "amount": 12.5,
                        "state": "pending",
                    }
                },
            }
        ).encode()
        response = httpx.post(
            f"{base}/webhooks/digital-river",
            content=body,
            headers=support.signed_headers(body),
            timeout=10,
        )
        assert response.status_code == 503
        assert response.json()["error"] == "broker_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503
        assert "redis" in ready.json()["message"]

        redis.start()
        worker = support.start_worker(env, "w503")
        # DR retries with a new timestamp and signature.
        response = httpx.post(
            f"{base}/webhooks/digital-river",
            content=body,
            headers=support.signed_headers(body),
            timeout=10,
        )
        assert response.status_code == 202
        assert support.wait_finished(engine, [event_id]) == {event_id: "applied"}
    finally:
        if worker:
            worker.stop()
        ingest.stop()
        engine.dispose()
        redis.cleanup()


def test_ingest_message_has_the_shape_kombu_writes(empty_queue: BareIngest) -> None:
    """The ingest wraps Celery's message itself; it must match what send_task writes."""
    from celery import Celery

    from worker.queue.contract import APPLY_TASK, apply_options

    body = _event()
    assert empty_queue.post(body, support.signed_headers(body)).status_code == 202
    ours = json.loads(empty_queue.redis.cli("RPOP", QUEUE))
    reference = Celery("reference", set_as_current=False)
    reference.conf.update(broker_url=empty_queue.redis.url, task_serializer="json")
    event = json.loads(body)
    reference.send_task(
        APPLY_TASK,
        args=[body.decode(), "2024-01-01T00:00:00+00:00", "webhook"],
        queue=QUEUE,
        ignore_result=False,
        **apply_options(event["id"], event["type"]),
    )
    reference.close()
    theirs = json.loads(empty_queue.redis.cli("RPOP", QUEUE))

    def shape(value: object) -> object:
        if isinstance(value, dict):
            return {key: shape(item) for key, item in value.items()}
        return type(value).__name__

    assert shape(ours) == shape(theirs)
    # Ids differ per message; reply_to names a result consumer, and there is none.
    volatile = {"id", "root_id", "origin", "correlation_id", "delivery_tag", "reply_to"}
    for part in ("headers", "properties"):
        same = {k: v for k, v in ours[part].items() if k not in volatile}
        assert same == {k: v for k, v in theirs[part].items() if k not in volatile}
    assert ours["content-type"] == theirs["content-type"] == "application/json"
    assert (
        json.loads(base64.b64decode(ours["body"]))[1:]
        == json.loads(base64.b64decode(theirs["body"]))[1:]
    )


@pytest.mark.parametrize(
    "signature",
    ["t={now},v0=\u00e9\u00e9", "t={now},\u00e9", "t=\u0661\u0662,abc"],
    ids=["non_ascii_signature", "non_ascii_bare_signature", "non_ascii_digits_timestamp"],
)
def test_non_ascii_signature_is_401_not_a_crash(empty_queue: BareIngest, signature: str) -> None:
    body = _event()
    header = signature.format(now=int(time.time())).encode()
    response = httpx.post(
        f"{empty_queue.base}/webhooks/digital-river",
        content=body,
        headers=[(b"Content-Type", b"application/json"), (b"DigitalRiver-Signature", header)],
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_signature"
    assert empty_queue.queued() == 0


def test_non_ascii_bearer_token_and_limit_are_refused_cleanly(bare: BareIngest) -> None:
    token = httpx.get(
        f"{bare.base}/events/x",
        headers=[(b"Authorization", "Bearer \u00e9".encode())],
        timeout=5,
    )
    assert token.status_code == 401
    auth = {"Authorization": f"Bearer {support.API_TOKEN}"}
    limit = httpx.get(f"{bare.base}/events?limit=%C2%B2", headers=auth, timeout=5)
    assert limit.status_code == 400
    assert limit.json()["error"] == "invalid_limit"


def test_a_hung_broker_gets_every_webhook_a_503_within_2_5_s(database: support.Database) -> None:
    """DR gives up on a delivery after 3 s: with Redis stopped (SIGSTOP, so connections
    hang rather than fail), 20 concurrent senders are each answered 503 within 2.5 s, twice
    over (the second wave behind the first's hung push), and a 202 again once it resumes."""
    redis = support.RedisServer().start()
    env = support.service_env(database.url, redis.url)
    ingest, base = support.start_ingest(env)
    redis_pid = redis.pid()

    async def wave() -> list[tuple[float, httpx.Response]]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def send() -> tuple[float, httpx.Response]:
                body = _event()
                started = time.monotonic()
                response = await client.post(
                    "/webhooks/digital-river", content=body, headers=support.signed_headers(body)
                )
                return time.monotonic() - started, response

            return await asyncio.gather(*(send() for _ in range(20)))

    try:
        body = _event()
        assert (
            httpx.post(
                f"{base}/webhooks/digital-river",
                content=body,
                headers=support.signed_headers(body),
                timeout=10,
            ).status_code
            == 202
        )
        os.kill(redis_pid, signal.SIGSTOP)
        for number in (1, 2):
            answers = asyncio.run(wave())
            codes = sorted({response.status_code for _, response in answers})
            slowest = max(elapsed for elapsed, _ in answers)
            print(f"wave {number}: codes {codes}, slowest answer {slowest:.2f} s")
            assert codes == [503]
            assert all(r.json()["error"] == "broker_unavailable" for _, r in answers)
            assert all(int(r.headers["Retry-After"]) > 0 for _, r in answers)
            assert slowest <= 2.5
        os.kill(redis_pid, signal.SIGCONT)

        def accepted_again() -> bool:
            body = _event()
            response = httpx.post(
                f"{base}/webhooks/digital-river",
                content=body,
                headers=support.signed_headers(body),
                timeout=10,
            )
            return response.status_code == 202

        support.wait_for(
            accepted_again, timeout=deadlines.LOCAL_PROCESS_S, what="a 202 once Redis resumes"
        )
    finally:
        os.kill(redis_pid, signal.SIGCONT)
        ingest.stop()
        redis.cleanup()

"""The worker's Redis transport keeps a message Redis stopped delivering halfway.

A delivery is two commands: the message is taken off the queue, then marked
unacknowledged. Here Redis stops between the two, deterministically: the test takes the
message itself, stops Redis, then marks it, the way kombu's `basic_get` does.
"""

from __future__ import annotations

from typing import Any

import pytest
from kombu.connection import Connection
from kombu.transport import TRANSPORT_ALIASES

from tests import deadlines, support
from worker.queue import redis_transport


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """refundsync's transport serves redis:// URLs in this process for the test only."""
    for scheme in ("redis", "rediss"):
        monkeypatch.setitem(TRANSPORT_ALIASES, scheme, TRANSPORT_ALIASES[scheme])
    redis_transport.register()


def test_a_message_taken_when_redis_stopped_goes_back_marked_redelivered() -> None:
    server = support.RedisServer(appendonly=True).start()
    try:
        with Connection(server.url) as connection:
            assert isinstance(connection.transport, redis_transport.Transport)
            connection.SimpleQueue("q").put({"n": 1})
            channel = connection.channel()
            message = channel.Message(channel._get("q"), channel=channel)
            server.cli("SHUTDOWN")  # with its append-only file, so the queue survives
            support.wait_for(
                lambda: not server.ping(), timeout=deadlines.LOCAL_PROCESS_S, what="redis down"
            )
            with pytest.raises(channel.connection_errors):
                channel.qos.append(message, message.delivery_tag)
        assert redis_transport._stranded

        server.start()
        # In no Redis key: without the worker it would be gone.
        assert server.cli("LLEN", "q") == "0"
        assert server.cli("HLEN", "unacked") == "0"
        with Connection(server.url) as connection:
            again = connection.SimpleQueue("q").get(timeout=5)
            assert again.payload == {"n": 1}
            assert again.delivery_info["redelivered"] is True
            again.ack()
        assert redis_transport._stranded == []
    finally:
        redis_transport._stranded.clear()
        server.cleanup()


def test_an_acknowledgement_after_the_connection_was_dropped_is_logged_not_fatal() -> None:
    server = support.RedisServer(appendonly=True).start()
    try:
        connection: Any = Connection(server.url)
        connection.SimpleQueue("q").put({"n": 1})
        channel = connection.channel()
        message = channel.Message(channel._get("q"), channel=channel)
        channel.qos.append(message, message.delivery_tag)
        # What Celery does when the broker goes away: the transport is dropped, and a task
        # that was running acknowledges afterwards, through the channel it came on.
        errors = connection.connection_errors + connection.channel_errors
        server.cli("SHUTDOWN")
        support.wait_for(
            lambda: not server.ping(), timeout=deadlines.LOCAL_PROCESS_S, what="redis down"
        )
        connection.collect()
        # Closing the channel may fail halfway with Redis gone; a worker caught it once its
        # pools were released, so the acknowledgement has to make a new Redis client.
        channel._disconnect_pools()
        logged: list[str] = []

        class Logger:
            def critical(self, msg: str, *args: object, **kwargs: object) -> None:
                logged.append(msg % args)

        message.ack_log_error(Logger(), errors)
        assert len(logged) == 1
        assert "Couldn't ack" in logged[0]
        # Still unacknowledged in Redis: the restore brings it back.
        server.start()
        assert server.cli("HLEN", "unacked") == "1"
    finally:
        server.cleanup()


def test_one_command_client_per_connection_pool() -> None:
    server = support.RedisServer().start()
    try:
        with Connection(server.url) as connection:
            channel = connection.channel()
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second
                assert first.ping()
            # As after a fork or a lost connection: a new pool, and a client on it.
            channel._disconnect_pools()
            with channel.conn_or_acquire() as third:
                assert third is not first
                assert third.connection_pool is channel.pool
                assert third.ping()
    finally:
        server.cleanup()

"""The worker's Redis transport keeps a message Redis stopped delivering halfway.

A delivery is two commands: the message is taken off the queue, then marked
unacknowledged. Here Redis stops between the two, deterministically: the test takes the
message itself, stops Redis, then marks it, the way kombu's `basic_get` does.
"""

from __future__ import annotations

import pytest
from kombu.connection import Connection
from kombu.transport import TRANSPORT_ALIASES

from tests import support
from worker import redis_broker


def test_a_message_taken_when_redis_stopped_goes_back_marked_redelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for scheme in ("redis", "rediss"):
        monkeypatch.setitem(TRANSPORT_ALIASES, scheme, TRANSPORT_ALIASES[scheme])
    redis_broker.register()
    server = support.RedisServer(appendonly=True).start()
    try:
        with Connection(server.url) as connection:  # type: ignore[no-untyped-call]
            assert isinstance(connection.transport, redis_broker.Transport)
            connection.SimpleQueue("q").put({"n": 1})
            channel = connection.channel()
            message = channel.Message(channel._get("q"), channel=channel)
            server.cli("SHUTDOWN")  # with its append-only file, so the queue survives
            support.wait_for(lambda: not server.ping(), timeout=10, what="redis down")
            with pytest.raises(channel.connection_errors):
                channel.qos.append(message, message.delivery_tag)
        assert redis_broker._stranded

        server.start()
        # In no Redis key: without the worker it would be gone.
        assert server.cli("LLEN", "q") == "0"
        assert server.cli("HLEN", "unacked") == "0"
        with Connection(server.url) as connection:  # type: ignore[no-untyped-call]
            again = connection.SimpleQueue("q").get(timeout=5)
            assert again.payload == {"n": 1}
            assert again.delivery_info["redelivered"] is True
            again.ack()
        assert redis_broker._stranded == []
    finally:
        redis_broker._stranded.clear()
        server.cleanup()

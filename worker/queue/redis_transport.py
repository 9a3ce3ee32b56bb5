"""kombu's Redis transport, with no message lost when Redis goes away mid-delivery, and no
worker stopped by a late acknowledgement after a lost connection.

A worker takes a message with BRPOP, which removes it from the queue, and only then marks
it unacknowledged (a second command, HSET), which is what brings it back if the worker
never acknowledges it. When Redis stops between the two, as in a restart just after the
ingest queued an event, kombu drops the message: it is in no Redis key and the worker
discards it with the broken connection. Here the worker keeps such a message and puts it
back on its queue, marked redelivered, as soon as it has a connection again.

A worker killed between the two commands still loses its message; the ingest's journal
publishes that event again (worker.queue.journal, docs/reliability.md).

When Celery loses the connection it drops the transport, but a channel can outlive it:
a task that finishes afterwards still acknowledges through it. If the channel has to make
a new connection pool for that, kombu fails with AttributeError, which Celery treats as a
bug and stops the worker. Here that channel raises a connection error instead, which
Celery logs and survives: the message stays unacknowledged in Redis and comes back after
the visibility timeout, where the event's deduplication finds it already applied. (A
channel that still has its pool sends the acknowledgement if Redis is back.)
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("refundsync.worker")

# Messages this process took off a queue but could not mark unacknowledged: (payload,
# exchange, routing key), as kombu keeps them in its unacknowledged hash. Module-wide
# because the channel that took them is discarded with its connection.
_stranded: list[tuple[dict[str, Any], str, str]] = []


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            delivery = message.delivery_info
            _stranded.append((message._raw, delivery["exchange"], delivery["routing_key"]))
            log.warning("broker.delivery_interrupted", extra={"delivery_tag": delivery_tag})
            raise


class Channel(kombu_redis.Channel):
    QoS = QoS
    # The client for one-off commands (acknowledgements, marking a message unacknowledged,
    # task events), with the connection pool it was made for.
    _command_client: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Connects (kombu pings Redis here); a new channel is the first moment a
        # stranded message can go back.
        super().__init__(*args, **kwargs)
        if _stranded:
            self._requeue_stranded()

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # Every new connection pool starts here; a dropped transport has no client to
        # take the address from.
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the broker connection was closed")
        params: dict[str, Any] = super()._connparams(asynchronous)
        return params

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis-py client for every one-off command, about a tenth of the
        # worker main process's time under load; a client is only a handle on the pool, so
        # one per pool serves them all. A new pool (after a fork or a reconnection) gets a
        # new client.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._command_client
        if client is None or client.connection_pool is not pool:
            client = self._command_client = super()._create_client()
        return client

    def _requeue_stranded(self) -> None:
        taken = list(_stranded)
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            for payload, exchange, routing_key in taken:
                self._do_restore_message(payload, exchange, routing_key, pipe)
            pipe.execute()
        del _stranded[: len(taken)]
        log.warning("broker.requeued_interrupted", extra={"messages": len(taken)})


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The channel above, finding its Redis through Sentinel (kombu's SentinelChannel
    makes the connection pools)."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def register() -> None:
    """Serve `redis://`, `rediss://` and `sentinel://` broker URLs with these transports in
    this process."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"

"""Publishing events.apply messages to the Celery queue on Redis."""

from __future__ import annotations

from functools import partial

import anyio.to_thread
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from models.errors import RefundSyncError
from models.messages import APPLY_TASK, apply_options

# DR gives up on a delivery after 3 s; a broker that has not answered in 2 s is treated as
# down so DR gets a 503 and retries, rather than a timeout.
BROKER_TIMEOUT_S = 2.0


class BrokerUnavailable(RefundSyncError):
    """The broker did not take the message; nothing was queued."""


class Publisher:
    """Sends raw events to the worker queue. Publishing returns once Redis has the message."""

    def __init__(self, redis_url: str, queue: str) -> None:
        self.queue = queue
        self._celery = Celery("refundsync-ingest", set_as_current=False)
        self._celery.conf.update(
            broker_url=redis_url,
            broker_connection_timeout=BROKER_TIMEOUT_S,
            broker_connection_retry=False,
            broker_transport_options={
                "max_retries": 0,
                "socket_connect_timeout": BROKER_TIMEOUT_S,
                "socket_timeout": BROKER_TIMEOUT_S,
            },
            task_serializer="json",
            result_backend=None,
        )

    def publish(self, body: str, event_id: str, event_type: str, received_at: str) -> None:
        """Queue one event; raise BrokerUnavailable if Redis did not take it."""
        try:
            self._celery.send_task(
                APPLY_TASK,
                args=[body, received_at, "webhook"],
                queue=self.queue,
                retry=False,
                ignore_result=True,
                **apply_options(event_id, event_type),
            )
        except (OperationalError, RedisError, OSError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc

    async def publish_async(
        self, body: str, event_id: str, event_type: str, received_at: str
    ) -> None:
        """publish() off the event loop (kombu's client is synchronous)."""
        await anyio.to_thread.run_sync(
            partial(self.publish, body, event_id, event_type, received_at)
        )

    def queue_depth(self) -> int:
        """Messages waiting in the worker queue; raise BrokerUnavailable if Redis is down."""
        try:
            with self._celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
                return int(connection.default_channel.client.llen(self.queue))
        except (OperationalError, RedisError, OSError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc

    def ping(self) -> None:
        """Raise BrokerUnavailable unless Redis answers."""
        try:
            with self._celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
                connection.default_channel.client.ping()
        except (OperationalError, RedisError, OSError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc

    def close(self) -> None:
        """Release broker connections."""
        self._celery.close()

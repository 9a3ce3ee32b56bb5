"""Publishing events.apply messages to the Celery queue on Redis, from the event loop
(and, in the standalone mode, to its SQLite broker through Celery itself).

Celery itself builds the message's shape once (`amqp.as_task_v2`: protocol 2 headers,
`argsrepr` for monitors); each request fills in its ids, wraps it in kombu's Redis
envelope and pushes it with one `LPUSH` on an asyncio connection: no thread hop and no
kombu producer per request. A worker consumes it exactly as one sent with `send_task`,
which the tests check.

Requests that arrive while a push is in flight are pushed together by the next one (one
`LPUSH` with many values): the group commit of a database log, for Redis. Each request
still answers only once Redis has taken its own message.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from models.brokers import RedisTarget, redis_target
from models.errors import RefundSyncError
from models.settings import Settings
from worker.queue import sqlite_transport
from worker.queue.connect import async_client
from worker.queue.contract import APPLY_TASK, apply_args, apply_options
from worker.queue.journal import PUSH_SCRIPT, JournalKeys, State, state_of
from worker.queue.keys import QueueKeys

# DR gives up on a delivery after 3 s; a broker that has not answered in 2 s is treated as
# down so DR gets a 503 and retries, rather than a timeout.
BROKER_TIMEOUT_S = 2.0
# How long a push waits for REFUNDSYNC_REDIS_MIN_REPLICAS replicas, inside that.
WAIT_MS = 1000
# REFUNDSYNC_JOURNAL_MAX_ENTRIES's default.
DEFAULT_JOURNAL_CAP = 200_000


class BrokerUnavailable(RefundSyncError):
    """The broker did not take the message; nothing was queued."""


class EventQueue(Protocol):
    """Where the ingest puts raw events for the workers."""

    async def publish(
        self,
        body: str,
        event_id: str,
        event_type: str,
        received_at: str,
        source: str = "webhook",
    ) -> None:
        """Queue one event (received as `source` says); raise BrokerUnavailable if the
        broker did not take it."""

    async def queue_depth(self) -> int:
        """Messages waiting in the worker queue; raise BrokerUnavailable if it is down."""

    async def journal_state(self) -> State | None:
        """The journal's size and oldest entry's age (None: this broker keeps none); raise
        BrokerUnavailable if it is down."""

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker answers."""

    async def close(self) -> None:
        """Release broker connections."""


def event_queue(
    settings: Settings, keys: QueueKeys, on_unjournaled: Callable[[int], None] | None = None
) -> EventQueue:
    """The publisher for this broker: Redis, or the standalone mode's SQLite file. Messages
    are sealed with `keys` (worker.queue.contract)."""
    broker_url = settings.redis_url or ""
    if sqlite_transport.is_standalone(broker_url):
        return CeleryPublisher(broker_url, settings.queue, keys)
    return Publisher(
        settings.broker(),
        settings.queue,
        keys,
        journal_cap=settings.journal_max_entries,
        min_replicas=settings.redis_min_replicas,
        on_unjournaled=on_unjournaled,
    )


async def signing_key(keys: QueueKeys) -> bytes:
    """The key that seals new messages: read from the database once, within
    BROKER_TIMEOUT_S; raises BrokerUnavailable if it cannot be read."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(keys.signing_key), BROKER_TIMEOUT_S)
    except TimeoutError:
        raise BrokerUnavailable("the queue key could not be read in time") from None
    except (SQLAlchemyError, RefundSyncError) as exc:
        raise BrokerUnavailable(f"the queue key cannot be read: {type(exc).__name__}") from exc


class Publisher:
    """Sends raw events to the worker queue, each with its journal entry
    (worker.queue.journal). Publishing returns once Redis has both, and, with
    `min_replicas`, once that many replicas have them too."""

    def __init__(
        self,
        redis_url: str | RedisTarget,
        queue: str,
        keys: QueueKeys,
        *,
        journal_cap: int = DEFAULT_JOURNAL_CAP,
        min_replicas: int = 0,
        on_unjournaled: Callable[[int], None] | None = None,
    ) -> None:
        target = redis_url if isinstance(redis_url, RedisTarget) else redis_target(redis_url)
        self.queue = queue
        self._keys = keys
        self._key: bytes | None = None
        self._journal = JournalKeys(queue)
        self._journal_cap = journal_cap
        self._min_replicas = min_replicas
        self._on_unjournaled = on_unjournaled
        # Only builds the message template; never connects.
        celery = Celery("refundsync-ingest", set_as_current=False)
        celery.conf.update(broker_url=target.url, task_serializer="json")
        template = celery.amqp.as_task_v2(
            "", APPLY_TASK, args=[], kwargs={}, **apply_options("", "")
        )
        self._headers: dict[str, Any] = dict(template.headers)
        self._properties: dict[str, Any] = dict(template.properties)
        self._embed = template.body[2]
        self._waiting: list[tuple[tuple[bytes, str], asyncio.Future[None]]] = []
        self._pusher: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis = async_client(target, BROKER_TIMEOUT_S)
        self._script = self._redis.register_script(PUSH_SCRIPT)

    def message(
        self,
        key: bytes,
        body: str,
        event_id: str,
        event_type: str,
        received_at: str,
        source: str = "webhook",
    ) -> bytes:
        """The Redis list entry kombu's Redis transport would write for this task, sealed
        with `key`."""
        task_id = str(uuid.uuid4())
        labels = apply_options(event_id, event_type)
        headers = {**self._headers, **labels, "id": task_id, "root_id": task_id}
        args = apply_args(key, body, received_at, source)
        payload = orjson.dumps([args, {}, self._embed])
        properties: dict[str, Any] = {
            **self._properties,
            **labels,
            "correlation_id": task_id,
            "delivery_mode": 2,
            # The default exchange: routed (and restored after a lost worker) by queue name.
            "delivery_info": {"exchange": "", "routing_key": self.queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        envelope = {
            "body": base64.b64encode(payload).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
        return orjson.dumps(envelope)

    async def publish(
        self,
        body: str,
        event_id: str,
        event_type: str,
        received_at: str,
        source: str = "webhook",
    ) -> None:
        """Queue one event (received as `source` says); raise BrokerUnavailable if Redis did
        not take it within BROKER_TIMEOUT_S of the call."""
        if self._key is None:
            self._key = await signing_key(self._keys)
        message = self.message(self._key, body, event_id, event_type, received_at, source)
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(((message, event_id), taken))
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.create_task(self._push())
        try:
            # The deadline is this request's own: behind a push that hangs, a request would
            # otherwise wait out that push's socket timeout and then its own.
            await asyncio.wait_for(asyncio.shield(taken), BROKER_TIMEOUT_S)
        except TimeoutError:
            # Not pushed yet: it never will be, the sender gets a 503 and DR sends it again.
            # Already in a push that Redis completes late: a second copy, which the workers
            # deduplicate.
            self._waiting = [(m, waiter) for m, waiter in self._waiting if waiter is not taken]
            raise BrokerUnavailable(f"the broker did not answer in {BROKER_TIMEOUT_S} s") from None

    async def _push(self) -> None:
        """Push everything waiting, batch after batch, one script in flight at a time."""
        while self._waiting:
            batch, self._waiting = self._waiting, []
            failure: BrokerUnavailable | None = BrokerUnavailable("the push did not finish")
            try:
                await self._send([part for parts, _ in batch for part in parts])
                failure = None
            except BrokerUnavailable as exc:
                failure = exc
            except (RedisError, OSError) as exc:
                failure = BrokerUnavailable(f"broker unreachable: {type(exc).__name__}")
            finally:
                # Every request of the batch gets its answer, even if this task is cancelled.
                for _, taken in batch:
                    if taken.done():
                        continue
                    if failure is None:
                        taken.set_result(None)
                    else:
                        taken.set_exception(failure)

    async def _send(self, parts: list[bytes | str]) -> None:
        """Run the journal's push script for these (message, event id) pairs; with
        min_replicas, in one pipeline with a WAIT on the same connection."""
        args: list[bytes | str | int] = [int(time.time() * 1000), self._journal_cap, *parts]
        keys = self._journal.script_keys()
        if not self._min_replicas:
            skipped = await self._script(keys=keys, args=args)
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                await self._script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", self._min_replicas, WAIT_MS)
                skipped, replicas = await pipe.execute()
            if int(replicas) < self._min_replicas:
                # Queued on the primary, but a failover now could lose it: DR is asked to
                # send it again (a copy the workers deduplicate) rather than told it is kept.
                raise BrokerUnavailable(
                    f"{replicas} of {self._min_replicas} Redis replicas confirmed the event"
                )
        if int(skipped) and self._on_unjournaled is not None:
            self._on_unjournaled(int(skipped))

    async def journal_state(self) -> State:
        """The journal's size and oldest entry's age; raise BrokerUnavailable if Redis is
        down."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zcard(self._journal.times)
                pipe.zrange(self._journal.times, 0, 0, withscores=True)
                size, oldest = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc
        return state_of(int(size), oldest, time.time() * 1000)

    async def queue_depth(self) -> int:
        """Messages waiting in the worker queue; raise BrokerUnavailable if Redis is down."""
        try:
            return int(await self._redis.llen(self.queue))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless Redis answers."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """Release broker connections."""
        await self._redis.aclose()


class CeleryPublisher:
    """Publishes with Celery's own `send_task`, from a thread, one at a time.

    For the standalone mode's SQLite broker, where throughput is not the point: the same
    message as the Redis publisher's, which the tests check on both.
    """

    def __init__(self, broker_url: str, queue: str, keys: QueueKeys) -> None:
        sqlite_transport.register()
        self.queue = queue
        self._keys = keys
        # A Celery app of its own: publishing needs only the broker, not the worker's app.
        self._app = Celery("refundsync-ingest", set_as_current=False)
        self._app.conf.update(
            broker_url=broker_url,
            broker_transport_options=sqlite_transport.TRANSPORT_OPTIONS,
            task_serializer="json",
        )
        self._lock = threading.Lock()

    def _send(
        self, body: str, event_id: str, event_type: str, received_at: str, source: str
    ) -> None:
        key = self._keys.signing_key()
        with self._lock:
            self._app.send_task(
                APPLY_TASK,
                args=apply_args(key, body, received_at, source),
                queue=self.queue,
                **apply_options(event_id, event_type),
            )

    def _depth(self) -> int:
        with self._lock, self._app.connection_for_read() as connection:
            declared = connection.default_channel.queue_declare(queue=self.queue, passive=True)
            return int(declared.message_count)

    async def publish(
        self,
        body: str,
        event_id: str,
        event_type: str,
        received_at: str,
        source: str = "webhook",
    ) -> None:
        """Queue one event; raise BrokerUnavailable if the broker did not take it.

        Not bounded by BROKER_TIMEOUT_S: the SQLite file is local, and a writer waits for
        another's lock rather than for a network."""
        try:
            await asyncio.to_thread(self._send, body, event_id, event_type, received_at, source)
        except (KombuError, SQLAlchemyError, RefundSyncError, OSError) as exc:
            raise BrokerUnavailable(f"broker unavailable: {type(exc).__name__}") from exc

    async def queue_depth(self) -> int:
        """Messages waiting in the worker queue; raise BrokerUnavailable if it is down."""
        try:
            return await asyncio.to_thread(self._depth)
        except (KombuError, SQLAlchemyError, OSError) as exc:
            raise BrokerUnavailable(f"broker unavailable: {type(exc).__name__}") from exc

    async def journal_state(self) -> State | None:
        """None: a message in the SQLite queue is taken and marked in one transaction, so
        no window needs a journal."""
        return None

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker answers."""
        await self.queue_depth()

    async def close(self) -> None:
        """Nothing to release: Celery's connection pool goes with the process."""

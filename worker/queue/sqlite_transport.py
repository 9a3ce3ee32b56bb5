"""The standalone mode's broker: kombu's SQLAlchemy transport on a SQLite file.

Chosen over kombu's filesystem transport because a SQLite file is transactional: a message
is stored whole or not at all, taking one is a single locked transaction even with the
ingest writing at the same moment, and the whole queue is one file beside the database.

kombu's transport marks a message invisible when a worker takes it and never deletes it,
so a message whose worker died mid-task would stay invisible for good. This one deletes a
message when it is acknowledged (or rejected, or put back), so every invisible message is
one a worker still holds; `prepare` makes them visible again when
`refundsync run` starts, before its one worker does. It also polls every 0.1 s, not 1 s.

kombu gives each channel one SQLAlchemy session, but a Celery worker on a transport with
no event loop of its own polls in its main thread and acknowledges from its pool's result
thread, at the same time; a session is not safe to share between threads, and a shared
one ends up stuck mid-commit, which stops the worker. Here each thread has its own.
"""

from __future__ import annotations

import json
import logging
import threading
from queue import Empty
from typing import Any

from kombu.connection import Connection
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models.db import SQLITE_BUSY_TIMEOUT_S

log = logging.getLogger("refundsync.worker")

SCHEME = "refundsync-sqlite"
# Options for its Celery apps; they go to SQLAlchemy's create_engine.
TRANSPORT_OPTIONS = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
# Where the message row's id travels with a delivered message.
_ROW = "refundsync_row"


def broker_url(path: str) -> str:
    """The broker URL for a SQLite file."""
    return f"{SCHEME}+sqlite:///{path}"


def is_standalone(url: str) -> bool:
    """Whether a broker URL is this SQLite broker rather than Redis."""
    return url.startswith(f"{SCHEME}+")


class Channel(kombu_sqlalchemy.Channel):
    """kombu's SQLAlchemy channel, deleting messages once they are settled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sessions = threading.local()
        self._factory: sessionmaker[Session] | None = None
        super().__init__(*args, **kwargs)
        # Kept now: kombu's _open needs the connection, which a closed channel no longer
        # has, and a thread may still acknowledge through it for the first time.
        self._session_factory()

    def _session_factory(self) -> sessionmaker[Session]:
        if self._factory is None:
            self._factory = self._open()[1]
        return self._factory

    @property
    def session(self) -> Session:
        """This thread's session on the queue file."""
        session: Session | None = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = self._session_factory()()
        return session

    # A statement or commit that fails (SQLite's "database is locked" once the busy timeout
    # runs out) leaves kombu's session unusable until it is rolled back: every later poll
    # would fail, and Celery would stop the worker. Each operation rolls back on failure.

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        try:
            return self._take(queue)
        except OperationalError as exc:
            self.session.rollback()
            # Nothing was taken; the next poll tries again.
            log.warning("broker.poll_failed", extra={"error": str(exc.orig)})
            raise Empty() from exc
        except SQLAlchemyError:
            self.session.rollback()
            raise

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:
        try:
            return super()._put(queue, payload, **kwargs)
        except SQLAlchemyError:
            # The publisher reports the failure (the ingest answers 503); the session
            # must stay usable for the next message.
            self.session.rollback()
            raise

    def _take(self, queue: str) -> Any:
        obj = self._get_or_create(queue)
        self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            message = (
                self.session.query(self.message_cls)
                .filter(self.message_cls.queue_id == obj.id)
                .filter(self.message_cls.visible.is_(True))
                .order_by(self.message_cls.sent_at, self.message_cls.id)
                .limit(1)
                .first()
            )
            if message is None:
                raise Empty()
            message.visible = False
            payload: dict[str, Any] = json.loads(message.payload)
            properties = payload["properties"]
            properties[_ROW] = message.id
            # kombu's virtual transports mark a message put back only at the top level;
            # Celery, and refundsync's count of attempts that died, read delivery_info.
            delivery_info = properties.setdefault("delivery_info", {})
            delivery_info["redelivered"] = bool(payload.get("redelivered"))
            return payload
        finally:
            self.session.commit()

    def _settle(self, message: Any) -> None:
        row = message.properties.get(_ROW) if message is not None else None
        if row is None:
            return
        try:
            self.session.query(self.message_cls).filter(self.message_cls.id == row).delete()
            self.session.commit()
        except SQLAlchemyError as exc:
            self.session.rollback()
            # The row stays taken: `run` makes it visible again at the next start, and a
            # second apply of its event changes nothing.
            log.warning("broker.settle_failed", extra={"row": row, "error": str(exc)})

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        message = self.qos._delivered.get(delivery_tag)
        super().basic_ack(delivery_tag, multiple=multiple)
        self._settle(message)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        message = self.qos._delivered.get(delivery_tag)
        # A requeued message is stored again as a new row first (see _restore).
        super().basic_reject(delivery_tag, requeue=requeue)
        if not requeue:
            self._settle(message)

    def _restore(self, message: Any) -> None:
        super()._restore(message)
        self._settle(message)


class Transport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport with the channel above."""

    Channel = Channel
    polling_interval = 0.1


def register() -> None:
    """Serve this broker's URLs (`broker_url`) with the transport above in this process."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"


def prepare(url: str, queue: str) -> int:
    """Create the broker's tables and queue, and make visible again the messages a worker
    held when it stopped; returns how many were restored.

    Run by `refundsync run` before it starts its processes: kombu creates tables and queues
    on first use in each process, and two processes doing that at once can collide. Only
    safe while no worker consumes from this broker.
    """
    register()
    with Connection(url) as connection:
        connection.default_channel.queue_declare(queue=queue)
    engine = create_engine(url.removeprefix(f"{SCHEME}+"))
    try:
        with engine.begin() as conn:
            # Marked redelivered: the attempt that held it may have died mid-event.
            restored = conn.exec_driver_sql(
                "UPDATE kombu_message SET visible = 1,"
                " payload = json_set(payload, '$.redelivered', json('true'))"
                " WHERE visible = 0"
            )
            return int(restored.rowcount)
    finally:
        engine.dispose()

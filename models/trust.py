"""The queue keys that seal events.apply messages, and the record of messages refused for
lacking a valid seal (see models.messages)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, insert, select

from models.errors import ConfigError
from models.messages import sealed
from models.tables import queue_keys, refused_messages


def load_keys(conn: Connection) -> list[bytes]:
    """Every queue key, newest first."""
    rows = conn.execute(select(queue_keys.c.secret).order_by(queue_keys.c.id.desc()))
    return [bytes.fromhex(secret) for (secret,) in rows]


def record_refusal(
    conn: Connection, *, event_id: str | None, event_type: str | None, source: str, reason: str
) -> None:
    """Keep a refused message's claims (never its payload) for operators."""
    conn.execute(
        insert(refused_messages).values(
            event_id=event_id, event_type=event_type, source=source[:255], reason=reason[:2000]
        )
    )


def refusals(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """The latest refused messages, newest first."""
    rows = conn.execute(
        select(refused_messages).order_by(refused_messages.c.id.desc()).limit(limit)
    )
    return [
        {
            "refusedAt": row.refused_at.isoformat(),
            "eventId": row.event_id,
            "eventType": row.event_type,
            "source": row.source,
            "reason": row.reason,
        }
        for row in rows
    ]


class QueueKeys:
    """A process's queue keys, read on first use by `load` (which may raise the database's
    errors) and again whenever a seal does not verify: a key added since (a rotation) is
    then known before any message is refused. A forged message so costs one query more,
    beside the insert that records it."""

    def __init__(self, load: Callable[[], list[bytes]]) -> None:
        self._load = load
        self._keys: list[bytes] = []
        self._lock = threading.Lock()

    def _reload(self) -> list[bytes]:
        with self._lock:
            keys = self._load()
            if not keys:
                raise ConfigError("no queue key: run `refundsync migrate`")
            self._keys = keys
            return keys

    def signing_key(self) -> bytes:
        """The newest key: what new messages are sealed with."""
        return (self._keys or self._reload())[0]

    def verifies(self, seal: object, body: str, received_at: str, source: str) -> bool:
        """Whether `seal` is a valid seal of these arguments."""
        keys = self._keys or self._reload()
        if sealed(keys, seal, body, received_at, source):
            return True
        return sealed(self._reload(), seal, body, received_at, source)

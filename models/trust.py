"""The queue keys that seal events.apply messages, as stored, and the record of messages
refused for lacking a valid seal (the seal itself: worker.queue.contract)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select

from models.ledger import ERROR_CHARS
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
            event_id=event_id,
            event_type=event_type,
            source=source[:255],
            reason=reason[:ERROR_CHARS],
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

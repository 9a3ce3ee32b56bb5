"""Logs: one JSON object per line, with the event and task ids bound.

Payloads carry customer names, emails and addresses; they are never logged. Log calls name
an event (`event.applied`) and pass ids and states as fields.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

# A reason or error in a log line is cut to this length: the whole of it is stored with the
# event (models.ledger.ERROR_CHARS), and a log line stays a line.
LOGGED_CHARS = 300

_bound: ContextVar[dict[str, str]] = ContextVar("refundsync_log_fields", default={})  # noqa: B039 - never mutated


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Add these fields to every log record made inside the block (this thread/task)."""
    token = _bound.set({**_bound.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _bound.reset(token)


def brief(text: str | None) -> str:
    """A reason or error as a log line carries it."""
    return (text or "")[:LOGGED_CHARS]


class _Fields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _bound.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        # Celery attaches its whole log context (task arguments included) as `data`.
        if hasattr(record, "data"):
            del record.data
        return True


def configure(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    handler.addFilter(_Fields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic announces each of its plugins at INFO; that is noise for operators.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # httpx logs every request at INFO; a reconciliation backfill makes thousands. The DR
    # client (worker.reconcile.dr_api) logs its retries and failures itself, with the fields that
    # matter.
    logging.getLogger("httpx").setLevel(logging.WARNING)

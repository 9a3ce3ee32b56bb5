"""Which database failures are worth another attempt."""

from __future__ import annotations

import sqlite3

import psycopg.errors
from sqlalchemy import exc as sa_exc

from models.errors import DatabaseBusy, PermanentError, TransientError

_TRANSIENT_SQLSTATES = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,  # statement_timeout
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
    psycopg.errors.TooManyConnections,
    # A failover onto a standby, or workers started before `refundsync migrate` finished:
    # both pass, and an event must wait for them rather than fail.
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
)


# SQLite's primary result codes for a lock another connection holds.
_SQLITE_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def classify(exc: sa_exc.DBAPIError) -> TransientError | PermanentError:
    """A typed error for a database failure: transient ones are retried, others recorded."""
    orig = exc.orig
    if (
        isinstance(orig, sqlite3.OperationalError)
        and getattr(orig, "sqlite_errorcode", 0) & 0xFF in _SQLITE_BUSY_CODES
    ):
        return DatabaseBusy(f"database: busy: {_first_line(orig)}")
    if (
        exc.connection_invalidated
        or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
        or isinstance(exc.orig, _TRANSIENT_SQLSTATES)
    ):
        return TransientError(f"database: {type(exc.orig).__name__}: {_first_line(exc.orig)}")
    return PermanentError(f"database refused the event: {_first_line(exc.orig)}")


def _first_line(error: BaseException | None) -> str:
    return str(error).splitlines()[0][:300] if error and str(error) else "(no message)"

"""Engines and the one transaction scope. Nothing connects at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

# Every statement and lock wait is bounded well inside the broker's visibility timeout,
# so a task never outlives the window in which its message is held for it.
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 5_000
# How long a SQLite transaction waits for the write lock (standalone mode).
SQLITE_BUSY_TIMEOUT_S = 15


def database_url(url: str) -> str:
    """Accept plain `postgresql://` URLs too; refundsync talks to Postgres through psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 5, pre_ping: bool = True) -> Engine:
    """An engine with bounded statements and lock waits.

    `pre_ping=False` saves a round trip per checkout where a failed statement is retried
    anyway: a connection found dead invalidates the pool, and the retry gets a fresh one.
    """
    full_url = database_url(url)
    if make_url(full_url).get_backend_name() == "sqlite":
        return _sqlite_engine(full_url)
    return create_engine(
        full_url,
        pool_pre_ping=pre_ping,
        pool_size=pool_size,
        connect_args={
            "connect_timeout": 5,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
            f" -c lock_timeout={LOCK_TIMEOUT_MS}",
            "application_name": "refundsync",
        },
    )


def _sqlite_engine(url: str) -> Engine:
    """SQLite for the standalone mode, correct by construction rather than by row locks.

    SQLite has no `SELECT ... FOR UPDATE`: every transaction instead takes the database's
    one write lock when it begins (`BEGIN IMMEDIATE`), so transactions that read and then
    write run one at a time, and a waiting one blocks up to the busy timeout. WAL lets
    readers (the read API) go on meanwhile.
    """
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _: Any) -> None:
        # Transactions are begun below, not by the driver's own guesswork.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_sqlite(connectable: Engine | Connection) -> bool:
    """Whether this is the standalone mode's SQLite."""
    return connectable.dialect.name == "sqlite"


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """The one place that commits: the block's work commits together or not at all."""
    with engine.begin() as connection:
        yield connection


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """For a single statement that commits on its own: no BEGIN or COMMIT round trips."""
    if is_sqlite(engine):
        # Every SQLite transaction is begun explicitly (see _sqlite_engine).
        with transaction(engine) as connection:
            yield connection
        return
    with engine.connect() as connection:
        yield connection.execution_options(isolation_level="AUTOCOMMIT")


def describe(exc: SQLAlchemyError) -> str:
    """One line about a database failure, for operators (never the SQL or its parameters)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300]}" if lines else type(cause).__name__

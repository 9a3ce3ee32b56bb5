"""Engines and the one transaction scope. Nothing connects at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

# Every statement and lock wait is bounded well inside the broker's visibility timeout,
# so a task never outlives the window in which its message is held for it.
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 5_000


def database_url(url: str) -> str:
    """Accept plain `postgresql://` URLs too; refundsync talks through psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 5, pre_ping: bool = True) -> Engine:
    """An engine with bounded statements and lock waits.

    `pre_ping=False` saves a round trip per checkout where a failed statement is retried
    anyway: a connection found dead invalidates the pool, and the retry gets a fresh one.
    """
    return create_engine(
        database_url(url),
        pool_pre_ping=pre_ping,
        pool_size=pool_size,
        connect_args={
            "connect_timeout": 5,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
            f" -c lock_timeout={LOCK_TIMEOUT_MS}",
            "application_name": "refundsync",
        },
    )


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """The one place that commits: the block's work commits together or not at all."""
    with engine.begin() as connection:
        yield connection


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """For a single statement that commits on its own: no BEGIN or COMMIT round trips."""
    with engine.connect() as connection:
        yield connection.execution_options(isolation_level="AUTOCOMMIT")


def describe(exc: SQLAlchemyError) -> str:
    """One line about a database failure, for operators (never the SQL or its parameters)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300]}" if lines else type(cause).__name__

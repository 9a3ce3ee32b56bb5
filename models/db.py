"""Engines and the one transaction scope. Nothing connects at import."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Insert,
    Table,
    bindparam,
    create_engine,
    event,
)
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.expression import Executable

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


def make_engine(
    url: str, *, pool_size: int = 5, pre_ping: bool = True, read_only: bool = False
) -> Engine:
    """An engine with bounded statements and lock waits.

    `pre_ping=False` saves a round trip per checkout where a failed statement is retried
    anyway: a connection found dead invalidates the pool, and the retry gets a fresh one.
    """
    full_url = database_url(url)
    if make_url(full_url).get_backend_name() == "sqlite":
        return _sqlite_engine(full_url, read_only=read_only)
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


def _sqlite_engine(url: str, *, read_only: bool) -> Engine:
    """SQLite for the standalone mode, correct by construction rather than by row locks.

    SQLite has no `SELECT ... FOR UPDATE`: every transaction instead takes the database's
    one write lock when it begins (`BEGIN IMMEDIATE`), so transactions that read and then
    write run one at a time, and a waiting one blocks up to the busy timeout. WAL lets
    readers (the read API, `read_only`) go on meanwhile: their transactions begin deferred
    and take no lock.
    """
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _: Any) -> None:
        # Transactions are begun below, not by the driver's own guesswork.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Every commit on disk before it returns, as the broker file's are: an outcome
        # must not be lost after its message was deleted.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

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


Params = dict[str, Any] | list[dict[str, Any]]


def execute_all(conn: Connection, writes: Sequence[tuple[Executable, Params]]) -> None:
    """Run statements whose results nobody reads, in order, in the caller's transaction.

    On Postgres they go out in one psycopg pipeline: one round trip for all of them instead
    of one each. Each is compiled once (SQLAlchemy's compiled form, kept per statement);
    the parameters are the statements' own bind names, which psycopg adapts as they are.
    """
    if not _pipelines(conn):
        for statement, params in writes:
            conn.execute(statement, params)
        return
    raw = _driver_connection(conn)
    sql = ""
    try:
        with raw.pipeline(), raw.cursor() as cursor:
            for statement, params in writes:
                sql, defaults, json = _compiled(statement, conn.dialect)
                if isinstance(params, list):
                    cursor.executemany(sql, [_adapted({**defaults, **row}, json) for row in params])
                else:
                    cursor.execute(sql, _adapted({**defaults, **params}, json))
    except psycopg.Error as exc:
        # The same typed error a statement run through SQLAlchemy would raise.
        raise DBAPIError.instance(sql, None, exc, psycopg.Error, dialect=conn.dialect) from exc


def _adapted(params: dict[str, Any], json: frozenset[str]) -> dict[str, Any]:
    # SQLAlchemy's JSON type would serialise these values; psycopg needs them marked.
    if not json:
        return params
    return {
        name: Jsonb(value) if name in json and value is not None else value
        for name, value in params.items()
    }


# Keyed by the statement's identity; each entry keeps its statement alive, so an id is
# never reused by another statement while it is here.
_COMPILED: dict[tuple[int, str], tuple[Executable, str, dict[str, Any], frozenset[str]]] = {}


def query_all(
    conn: Connection, queries: Sequence[tuple[Executable, dict[str, Any]]]
) -> list[list[Any]]:
    """Run statements in order, in the caller's transaction, and return each one's rows.

    On Postgres they go out in one psycopg pipeline (one round trip, the transaction's
    BEGIN included); each still runs on its own, seeing what committed before it started,
    so a read after a lock sees everything the lock's previous holder wrote. Rows have
    attribute access, as SQLAlchemy's do.
    """
    if not _pipelines(conn):
        return [list(conn.execute(statement, params)) for statement, params in queries]
    raw = _driver_connection(conn)
    sql = ""
    try:
        with raw.pipeline() as pipeline:
            cursors = []
            for statement, params in queries:
                sql, defaults, json = _compiled(statement, conn.dialect)
                cursor = raw.cursor(row_factory=namedtuple_row)
                cursor.execute(sql, _adapted({**defaults, **params}, json))
                cursors.append(cursor)
            pipeline.sync()
            return [cursor.fetchall() for cursor in cursors]
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql, None, exc, psycopg.Error, dialect=conn.dialect) from exc


def _pipelines(conn: Connection) -> bool:
    # psycopg 3 pipelines; any other driver runs the statements one by one.
    return conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"


def _driver_connection(conn: Connection) -> psycopg.Connection[Any]:
    raw = conn.connection.driver_connection
    # Only called where _pipelines said the driver is psycopg.
    assert isinstance(raw, psycopg.Connection)  # noqa: S101
    return raw


def _compiled(
    statement: Executable, dialect: Dialect
) -> tuple[str, dict[str, Any], frozenset[str]]:
    """The statement's SQL, its default parameters, and the names of its JSON parameters."""
    key = (id(statement), dialect.name)
    found = _COMPILED.get(key)
    if found is None:
        compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=dialect))
        # Only plain named parameters: no expanding IN lists or post-compile values, which
        # the compiled string alone would not carry.
        assert not compiled.post_compile_params  # noqa: S101 - a programming error
        json = frozenset(
            name
            for name, bind in compiled.binds.items()
            if isinstance(bind.type.dialect_impl(dialect), JSON)
        )
        found = _COMPILED[key] = (statement, str(compiled), dict(compiled.params), json)
    return found[1], found[2], found[3]


def describe(exc: SQLAlchemyError) -> str:
    """One line about a database failure, for operators (never the SQL or its parameters)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300]}" if lines else type(cause).__name__


def insert_statement(dialect: str, table: Table) -> postgresql.Insert:
    """The dialect's INSERT, the one with ON CONFLICT (Postgres and SQLite spell it alike)."""
    if dialect == "sqlite":
        # SQLite's Insert has the same on_conflict_* methods and `excluded`.
        return cast(postgresql.Insert, sqlite.insert(table))
    return postgresql.insert(table)


def upsert(dialect: str, table: Table, keys: tuple[str, ...], fields: tuple[str, ...]) -> Insert:
    """Insert a row from bound parameters named after its columns, or update its fields."""
    statement = insert_statement(dialect, table).values(
        # Typed as their columns, so that JSON values are serialised as such.
        {name: bindparam(name, type_=table.c[name].type) for name in keys + fields}
    )
    return statement.on_conflict_do_update(
        index_elements=[table.c[key] for key in keys],
        set_={name: statement.excluded[name] for name in fields},
    )


def insert_for(conn: Connection, table: Table) -> postgresql.Insert:
    """The INSERT with ON CONFLICT for this connection's database."""
    return insert_statement(conn.dialect.name, table)


def payload_value(dialect: str, raw: Any) -> Any:
    """The raw JSON text as a stored payload."""
    if dialect == "sqlite":
        return raw
    # Postgres parses the raw text; the payload is never decoded and encoded again here.
    return sa_cast(raw, postgresql.JSONB)

"""The retry policy: which database failures wait for a backoff and which are tried at once."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, exc, text

from models.errors import DatabaseBusy, TransientError
from worker.errors import classify
from worker.policy import MAX_RETRY_COUNTDOWN_S, retry_countdown


@pytest.fixture
def database() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="refundsync-retry-") as directory:
        yield Path(directory) / "busy.db"


def _busy_error(path: Path) -> exc.DBAPIError:
    """What a write meets while another connection holds SQLite's write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (n INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
    except exc.DBAPIError as error:
        return error
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()
    raise AssertionError("the write went through a held lock")


def test_a_sqlite_database_locked_by_another_writer_is_busy_not_a_lost_database(
    database: Path,
) -> None:
    error = classify(_busy_error(database))
    assert isinstance(error, DatabaseBusy)
    assert "locked" in str(error)


def test_a_busy_database_is_tried_again_at_once_whatever_the_retry_count(
    database: Path,
) -> None:
    busy = classify(_busy_error(database))
    assert [retry_countdown(busy, retries) for retries in (0, 5, 19)] == [0.0, 0.0, 0.0]


def test_other_transient_errors_back_off_exponentially_up_to_the_cap() -> None:
    lost = TransientError("database: OperationalError: connection refused")
    for retries in range(12):
        countdowns = [retry_countdown(lost, retries) for _ in range(50)]
        assert all(0 <= c <= min(2**retries, MAX_RETRY_COUNTDOWN_S) for c in countdowns)
    # Full jitter: later retries spread over the whole window, not bunched at its start.
    assert max(retry_countdown(lost, 11) for _ in range(200)) > MAX_RETRY_COUNTDOWN_S / 2


def test_a_missing_sqlite_table_is_not_busy(database: Path) -> None:
    engine = create_engine(f"sqlite:///{database}")
    try:
        with pytest.raises(exc.DBAPIError) as raised, engine.begin() as conn:
            conn.execute(text("SELECT * FROM missing"))
    finally:
        engine.dispose()
    assert not isinstance(classify(raised.value), DatabaseBusy)

"""The standalone mode's SQLite queue (worker.queue.sqlite_transport) on its own: what a
worker that dies holding a message leaves behind, and what `refundsync run` makes of it at
the next start."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

import pytest
from kombu.connection import Connection

from tests import deadlines
from worker.queue.sqlite_transport import broker_url, prepare, register

_TAKE_AND_DIE = """
import os, sys
from kombu.connection import Connection
from worker.queue import sqlite_transport
sqlite_transport.register()
connection = Connection(sys.argv[1])
message = connection.SimpleQueue("q").get(timeout=5)
print(message.payload, bool(message.delivery_info.get("redelivered")), flush=True)
os._exit(0)
"""


@pytest.fixture
def url() -> Iterator[str]:
    register()
    path = Path(tempfile.mkdtemp(prefix="refundsync-broker-"))
    try:
        yield broker_url(str(path / "broker.db"))
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _rows(url: str) -> list[tuple[int, int]]:
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT id, visible FROM kombu_message ORDER BY id").fetchall()


def test_a_message_held_by_a_dead_worker_comes_back_marked_redelivered(url: str) -> None:
    assert prepare(url, "q") == 0
    with Connection(url) as connection:
        connection.SimpleQueue("q").put({"n": 1})
    # A consumer that takes the message and dies: no ack, no orderly restore.
    taker = subprocess.run(
        [sys.executable, "-c", _TAKE_AND_DIE, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert taker.stdout.split() == ["{'n':", "1}", "False"]
    assert [visible for _, visible in _rows(url)] == [0]

    assert prepare(url, "q") == 1
    with Connection(url) as connection:
        again = connection.SimpleQueue("q").get(timeout=deadlines.LOCAL_PROCESS_S)
        assert again.payload == {"n": 1}
        assert again.delivery_info["redelivered"] is True
        again.ack()
    assert _rows(url) == []


def test_acknowledged_and_rejected_messages_leave_the_file(url: str) -> None:
    prepare(url, "q")
    with Connection(url) as connection:
        queue = connection.SimpleQueue("q")
        for n in range(3):
            queue.put({"n": n})
        queue.get(timeout=deadlines.LOCAL_PROCESS_S).ack()
        queue.get(timeout=deadlines.LOCAL_PROCESS_S).reject()
        requeued = queue.get(timeout=deadlines.LOCAL_PROCESS_S)
        requeued.requeue()
        assert [visible for _, visible in _rows(url)] == [1]
        back = queue.get(timeout=deadlines.LOCAL_PROCESS_S)
        assert back.payload == {"n": 2}
        assert back.delivery_info["redelivered"] is True
        back.ack()
    assert _rows(url) == []


def test_a_poll_that_finds_the_file_locked_is_empty_and_the_next_one_works(url: str) -> None:
    prepare(url, "q")
    path = url.split(":///", 1)[1]
    # SQLite's busy timeout (1 s here) runs out while another process holds the write lock.
    options = {"connect_args": {"timeout": 1}}
    with Connection(url, transport_options=options) as connection:
        connection.SimpleQueue("q").put({"n": 1})
        channel = connection.channel()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(Empty):
                channel._get("q")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert channel._get("q")["body"]
    assert [visible for _, visible in _rows(url)] == [0]


def test_messages_acknowledged_from_another_thread_while_polling_all_leave_the_file(
    url: str,
) -> None:
    # Celery's worker, with a transport that has no event loop of its own (this one),
    # polls in its main thread and acknowledges from the pool's result thread, at once.
    prepare(url, "q")
    count = 300
    with Connection(url) as connection:
        queue = connection.SimpleQueue("q")
        for n in range(count):
            queue.put({"n": n})
        taken: SimpleQueue[Any] = SimpleQueue()
        failures: list[BaseException] = []

        def acknowledge() -> None:
            while (message := taken.get()) is not None:
                try:
                    message.ack()
                except Exception as exc:  # noqa: BLE001 - the test reports them all
                    failures.append(exc)

        acker = threading.Thread(target=acknowledge)
        acker.start()
        try:
            for _ in range(count):
                taken.put(queue.get(timeout=deadlines.LOCAL_PROCESS_S))
        finally:
            taken.put(None)
            acker.join(timeout=deadlines.APPLY_S)
    assert not acker.is_alive(), "acknowledging stopped"
    assert failures == []
    assert _rows(url) == []

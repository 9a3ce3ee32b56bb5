"""Session-wide real services. Every test run gets its own database and Redis server and
removes them afterwards, so runs never see each other's data."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from models.migrate import upgrade
from tests import support
from tests.fake_dr import FakeDR
from tests.support import Stack

# The session stack's process logs, shown only for the tests that use it.
_STACK_LOGS: set[Path] = set()


@pytest.fixture(scope="session", autouse=True)
def scratch() -> Iterator[Path]:
    """The temporary directory of the processes tests start (support.SCRATCH)."""
    path = Path(tempfile.mkdtemp(prefix="refundsync-tests-"))
    support.SCRATCH = path
    try:
        yield path
    finally:
        support.SCRATCH = None
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def database() -> Iterator[support.Database]:
    db = support.Database().create()
    try:
        upgrade(db.url)
        yield db
    finally:
        db.drop()


@pytest.fixture
def fake() -> Iterator[FakeDR]:
    """A fake of DR's REST API on loopback."""
    server = FakeDR().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack(database: support.Database) -> Iterator[Stack]:
    redis = support.RedisServer().start()
    env = support.service_env(database.url, redis.url)
    processes: list[support.Process] = []
    engine = support.engine_for(database.url)
    try:
        ingest, base = support.start_ingest(env)
        processes.append(ingest)
        processes.extend(support.start_worker(env, name) for name in ("w1", "w2"))
        _STACK_LOGS.update(process.log_path for process in processes)
        yield Stack(base, database.url, redis, engine, env, processes)
    finally:
        for process in processes:
            process.stop()
        engine.dispose()
        redis.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        # The session's shared stack only where the test used it; every other process
        # still running belongs to this test.
        uses_stack = "stack" in getattr(item, "funcargs", {})
        for path, name in list(support.RUNNING_LOGS.items()):
            if path in _STACK_LOGS and not uses_stack:
                continue
            try:
                tail = path.read_text(errors="replace")[-6000:]
            except FileNotFoundError:
                continue
            report.sections.append((f"log of {name}", tail))
    return report

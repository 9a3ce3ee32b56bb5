"""Redis over TLS (`rediss://`) with a private CA on loopback: the ingest and a worker work
through it, and a CA that does not verify Redis's certificate stops each with one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import deadlines, eventgen, support


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[support.RedisServer, support.TlsFiles, int]]:
    files = support.make_tls_files(tmp_path)
    tls_port = support.free_port()
    # The plain port is the test's own (redis-cli); the service gets the TLS port only.
    server = support.RedisServer(
        extra=[
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(files.cert),
            "--tls-key-file",
            str(files.key),
            "--tls-ca-cert-file",
            str(files.ca),
            "--tls-auth-clients",
            "no",
        ]
    ).start()
    try:
        yield server, files, tls_port
    finally:
        server.cleanup()


def test_ingest_and_worker_work_through_tls(
    database: support.Database, tls_redis: tuple[support.RedisServer, support.TlsFiles, int]
) -> None:
    server, files, tls_port = tls_redis
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={files.ca}"
    env = support.service_env(database.url, url)
    # A seed no other test uses: event ids come from it, and the session's database is shared.
    events = eventgen.histories(1905, 1, 8, "tls")
    ingest, base = support.start_ingest(env)
    worker = support.start_worker(env, "tls", 1)
    engine = support.engine_for(database.url)
    try:
        for event in events:
            assert support.post_event(base, json.dumps(event).encode()).status_code == 202
        support.wait_finished(engine, [str(e["id"]) for e in events], timeout=deadlines.APPLY_S)
        expected = eventgen.expected_summaries(events)
        assert support.summaries(engine, list(expected)) == expected
        assert httpx.get(f"{base}/readyz", timeout=deadlines.LOCAL_PROCESS_S).status_code == 200
    finally:
        worker.stop()
        ingest.stop()
        engine.dispose()
    # Nothing went over the plain port but the test's own commands: the service used TLS.
    assert server.cli("LLEN", "refundsync") == "0"


@pytest.mark.parametrize("command", [["ingest", "--port"], ["worker", "--concurrency", "1"]])
def test_a_ca_that_does_not_verify_redis_is_refused_in_one_line(
    database: support.Database,
    tls_redis: tuple[support.RedisServer, support.TlsFiles, int],
    tmp_path: Path,
    command: list[str],
) -> None:
    _, _, tls_port = tls_redis
    other = tmp_path / "other"
    other.mkdir()
    wrong = support.make_tls_files(other, "another")
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={wrong.ca}"
    if command[-1] == "--port":
        command = [*command, str(support.free_port())]
    result = support.run_cli(support.service_env(database.url, url), *command)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "refundsync: REDIS_URL: Redis's TLS certificate does not verify"
        " (check ssl_ca_certs and the server's host name)"
    ], result.stderr

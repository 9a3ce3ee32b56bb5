"""Real services for tests: private Redis servers, a throwaway database, and the
refundsync processes themselves (ingest and Celery workers) as subprocesses."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis as redis_client
from sqlalchemy import Engine, text

from models import trust
from models.db import make_engine
from models.signature import sign
from tests import deadlines, eventgen
from worker.queue.keys import QueueKeys

SECRET = "whsec_test_primary"
OTHER_SECRET = "whsec_test_rotating"
API_TOKEN = "test-read-token"
ADMIN_DSN = os.environ.get(
    "REFUNDSYNC_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
FIXTURES = Path(__file__).parent / "fixtures"


# Log files of the subprocesses still running, by name: a failing test's report shows
# their tails (tests/conftest.py), since their output is the only trace of what happened.
RUNNING_LOGS: dict[Path, str] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Any, *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a free port; never the machine's shared one."""

    def __init__(
        self, *, appendonly: bool = False, extra: Sequence[str] = (), password: str | None = None
    ) -> None:
        self.port = free_port()
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="refundsync-redis-"))
        self.appendonly = appendonly
        # More redis-server options: a replica's `--replicaof`, TLS ports.
        self.extra = list(extra)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        subprocess.run(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--dir",
                str(self.dir),
                "--daemonize",
                "yes",
                "--logfile",
                str(self.dir / "redis.log"),
                *self.extra,
                *(("--requirepass", self.password) if self.password else ()),
            ],
            check=True,
        )
        wait_for(self.ping, timeout=deadlines.LOCAL_PROCESS_S, what=f"redis on {self.port}")
        return self

    def ping(self) -> bool:
        try:
            return self.cli("PING") == "PONG"
        except subprocess.CalledProcessError:
            return False

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            env={**os.environ, "REDISCLI_AUTH": self.password} if self.password else None,
        )
        if out.stdout.startswith("Could not connect"):
            raise subprocess.CalledProcessError(1, "redis-cli")
        return out.stdout.strip()

    def pid(self) -> int:
        found = re.search(r"process_id:(\d+)", self.cli("INFO", "server"))
        assert found, "redis INFO names no process id"
        return int(found.group(1))

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.cli("SHUTDOWN", "NOSAVE")
        wait_for(lambda: not self.ping(), timeout=deadlines.LOCAL_PROCESS_S, what="redis to stop")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Stream:
    """Senders posting events to an ingest as DR does: each event retried with a backoff
    until it gets a 202, a pause after each."""

    def __init__(self, base: str, bodies: list[bytes], *, pause: float, senders: int = 8) -> None:
        self.base = base
        self.pause = pause
        self.accepted = 0
        self.refused = 0
        # The ids of the events that got their 202, in that order.
        self.accepted_ids: list[str] = []
        self._queue = list(bodies)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send) for _ in range(senders)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert self.done, "a sender never got its 202"

    def _send(self) -> None:
        with httpx.Client(timeout=5) as client:
            while True:
                with self._lock:
                    if not self._queue:
                        return
                    body = self._queue.pop()
                delay = 0.2
                while True:
                    try:
                        response = client.post(
                            f"{self.base}/webhooks/digital-river",
                            content=body,
                            headers=signed_headers(body),
                        )
                        if response.status_code == 202:
                            with self._lock:
                                self.accepted += 1
                                self.accepted_ids.append(response.json()["id"])
                            break
                        assert response.status_code == 503, response.text
                        with self._lock:
                            self.refused += 1
                    except httpx.HTTPError:
                        pass
                    time.sleep(delay)
                    delay = min(delay * 2, 2)
                time.sleep(self.pause)


class SentinelGroup:
    """A Redis primary, one replica and three Sentinels watching them, on loopback; the
    REDIS_URL that reaches the primary through them."""

    MASTER = "mymaster"

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer()
        self.dir = Path(tempfile.mkdtemp(prefix="refundsync-sentinel-"))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.url = ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)
        self.url += "/0"

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.extra = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        wait_for(
            lambda: "master_link_status:up" in self.replica.cli("INFO", "replication"),
            timeout=deadlines.LOCAL_PROCESS_S,
            what="the replica in sync",
        )
        for port in self.sentinel_ports:
            config = self.dir / f"sentinel-{port}.conf"
            # Sentinel rewrites its configuration file as it learns: one each, writable.
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.dir / f'sentinel-{port}.log'}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
            )
            # Debian's redis-sentinel, or the same binary in its Sentinel mode.
            sentinel = shutil.which("redis-sentinel")
            command = [sentinel] if sentinel else ["redis-server", "--sentinel"]
            subprocess.run([*command, str(config), "--daemonize", "yes"], check=True)
        wait_for(self._watching, timeout=deadlines.LOCAL_PROCESS_S * 3, what="sentinels watching")
        return self

    def sentinel_cli(self, port: int, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return out.stdout.strip()

    def _watching(self) -> bool:
        # Each Sentinel knows the replica and the two other Sentinels: a failover can run.
        for port in self.sentinel_ports:
            info = self.sentinel_cli(port, "INFO", "sentinel")
            if "slaves=1" not in info or "sentinels=3" not in info:
                return False
        return True

    def master_port(self) -> int | None:
        answer = self.sentinel_cli(
            self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", self.MASTER
        ).split()
        return int(answer[1]) if len(answer) == 2 else None

    def cleanup(self) -> None:
        for port in self.sentinel_ports:
            with contextlib.suppress(subprocess.SubprocessError):
                self.sentinel_cli(port, "SHUTDOWN", "NOSAVE")
        wait_for(
            lambda: all(not self.sentinel_cli(port, "PING") for port in self.sentinel_ports),
            timeout=deadlines.LOCAL_PROCESS_S,
            what="sentinels to stop",
        )
        for server in (self.primary, self.replica):
            server.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate it signed (for 127.0.0.1 and localhost)."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path, name: str = "refundsync-test") -> TlsFiles:
    """A self-signed CA and a server certificate, made with openssl in `directory`."""
    ca_key, ca = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name} CA",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ],
        [
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        ],
    ]
    for step in steps:
        subprocess.run(["openssl", *step], check=True, capture_output=True, timeout=60)
    return TlsFiles(ca, cert, key)


@dataclass
class Database:
    """A database of its own on the shared Postgres, dropped afterwards."""

    name: str = field(default_factory=lambda: f"refundsync_test_{uuid.uuid4().hex[:12]}")

    @property
    def url(self) -> str:
        base = ADMIN_DSN.rsplit("/", 1)[0]
        return f"{base}/{self.name}"

    def create(self) -> Database:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# The TMPDIR of every process a test starts (set by tests/conftest.py for the session, and
# removed with all in it at its end): a process the test kills cannot remove its own
# temporary files (multiprocessing's pymp-*, a metrics directory), and they must not stay.
SCRATCH: Path | None = None


def service_env(db_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DR_", "REFUNDSYNC_"))}
    if SCRATCH is not None:
        env["TMPDIR"] = str(SCRATCH)
    env.update(
        DATABASE_URL=db_url,
        REDIS_URL=redis_url,
        DR_WEBHOOK_SECRETS=f"{SECRET},{OTHER_SECRET}",
        REFUNDSYNC_API_TOKEN=API_TOKEN,
        # Several workers share this host; a test that reads worker metrics picks a port.
        REFUNDSYNC_METRICS_ADDR="",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Process:
    """A refundsync subprocess whose output goes to a log file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str],
        *,
        module: bool = True,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"refundsync-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        RUNNING_LOGS[self.log_path] = name
        # By default the refundsync CLI; module=False runs `python <args>` as given.
        command = [sys.executable, "-m", "worker.cli", *args] if module else [sys.executable, *args]
        # A metrics directory of its own, removed with the process even if it is killed.
        self.metrics_dir = tempfile.mkdtemp(prefix=f"refundsync-test-metrics-{name}-")
        self.proc = subprocess.Popen(
            command,
            env={**env, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Another checkout's code, for a benchmark's baseline (its modules come first).
            cwd=cwd,
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""  # removed when the process was stopped

    def wait_for_log(self, needle: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-4000:]}")
            return needle in self.log()

        wait_for(seen, timeout=timeout, what=f"{self.name} to log {needle!r}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        RUNNING_LOGS.pop(self.log_path, None)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def start_ingest(env: Mapping[str, str]) -> tuple[Process, str]:
    port = free_port()
    process = Process("ingest", ["ingest", "--port", str(port)], env)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.proc.poll() is not None:
            raise RuntimeError(f"ingest exited early:\n{process.log()[-4000:]}")
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=deadlines.PROCESS_START_S, what="ingest /healthz")
    return process, base


def start_worker(
    env: Mapping[str, str],
    name: str,
    concurrency: int = 1,
    *extra: str,
    cwd: Path | None = None,
) -> Process:
    """A `refundsync worker`, once it is ready; stopped again if it never gets there."""
    process = Process(
        f"worker-{name}",
        [
            "worker",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
            *extra,
        ],
        env,
        cwd=cwd,
    )
    try:
        process.wait_for_log("ready.", timeout=deadlines.PROCESS_START_S)
    except BaseException:
        process.stop()
        raise
    return process


def run_cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`refundsync ARGS` in a process of its own, from this checkout, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )


def python_json(code: str, env: Mapping[str, str]) -> Any:
    """Run `code` in a fresh interpreter at the project's root; its last line of output, as
    JSON (for reading what a process really loads or does at start-up)."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(result.stdout.splitlines()[-1])


def signed_headers(
    body: bytes, *, secret: str = SECRET, timestamp: int | None = None
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "DigitalRiver-Signature": sign(secret, body, timestamp),
    }


def post_event(base: str, event: Mapping[str, Any] | bytes, **kwargs: Any) -> httpx.Response:
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    return httpx.post(
        f"{base}/webhooks/digital-river",
        content=body,
        headers=signed_headers(body, **kwargs),
        timeout=10,
    )


def outcomes(engine: Engine, ids: list[str]) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, outcome FROM webhook_events WHERE id = ANY(:ids)"), {"ids": ids}
        )
        return {row.id: row.outcome for row in rows}


def wait_finished(
    engine: Engine, ids: list[str], timeout: float = deadlines.APPLY_S
) -> dict[str, str]:
    wanted = set(ids)

    def done() -> dict[str, str] | None:
        found = outcomes(engine, list(wanted))
        if set(found) == wanted and all(o != "queued" for o in found.values()):
            return found
        return None

    try:
        found: dict[str, str] = wait_for(
            done, timeout=timeout, interval=0.1, what=f"{len(wanted)} events to finish"
        )
    except TimeoutError as exc:
        seen = outcomes(engine, list(wanted))
        missing = sorted(wanted - set(seen))
        queued = sorted(event_id for event_id, outcome in seen.items() if outcome == "queued")
        raise TimeoutError(
            f"{exc}: {len(missing)} never recorded (e.g. {missing[:3]}), "
            f"{len(queued)} still queued (e.g. {queued[:3]})"
        ) from None
    return found


def engine_for(url: str) -> Engine:
    return make_engine(url, pool_size=2)


def load_fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class PostgresCluster:
    """A private PostgreSQL cluster on a free port, for tests that stop the database.

    Made with Debian's pg_createcluster (which switches to the postgres user), never the
    machine's shared cluster; dropped afterwards.
    """

    def __init__(self) -> None:
        self.version = sorted(os.listdir("/etc/postgresql"))[-1]
        self.name = f"rsfault{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/refundsync"

    def create(self) -> PostgresCluster:
        subprocess.run(
            [
                "pg_createcluster",
                self.version,
                self.name,
                "-p",
                str(self.port),
                "--",
                "--auth=trust",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.start()
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE refundsync")
        return self

    def start(self) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def stop(self) -> None:
        subprocess.run(
            [
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                self.version,
                self.name,
                "stop",
                "-m",
                "fast",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def drop(self) -> None:
        subprocess.run(
            ["pg_dropcluster", "--stop", self.version, self.name],
            check=False,
            capture_output=True,
            timeout=120,
        )


def queue_keys(db_url: str) -> QueueKeys:
    """The queue keys of the database at `db_url`, as a refundsync process reads them."""

    def load() -> list[bytes]:
        engine = engine_for(db_url)
        try:
            with engine.connect() as conn:
                return trust.load_keys(conn)
        finally:
            engine.dispose()

    return QueueKeys(load)


def publish_all(
    redis_url: str, db_url: str, bodies: list[bytes], *, key: bytes | None = None
) -> None:
    """Queue raw events the way the ingest does (same publisher, same sealed message),
    sealed with the database's key, or with `key`."""
    import asyncio
    from datetime import UTC, datetime

    from worker.queue.publish import Publisher

    keys = queue_keys(db_url) if key is None else QueueKeys(lambda: [key])

    async def publish() -> None:
        publisher = Publisher(redis_url, "refundsync", keys)
        try:
            for body in bodies:
                event = json.loads(body)
                await publisher.publish(
                    body.decode(), event["id"], event["type"], datetime.now(UTC).isoformat()
                )
        finally:
            await publisher.close()

    asyncio.run(publish())


@dataclass
class Tally:
    """Zero lost, zero doubled: what the database says about a set of events."""

    sent: int
    applied: int
    lost: int
    doubled: int
    suppressed: int
    retried: int
    failed: int

    def line(self, scenario: str, recovery_s: float | None = None) -> str:
        recovery = "-" if recovery_s is None else f"{recovery_s:.1f}"
        return (
            f"RELIABILITY scenario={scenario} sent={self.sent} applied={self.applied}"
            f" lost={self.lost} doubled={self.doubled} suppressed={self.suppressed}"
            f" retried={self.retried}"
            f" failed={self.failed} recovery_s={recovery}"
        )


def tally(engine: Engine, ids: list[str]) -> Tally:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE outcome IN ('applied', 'stale', 'ignored')) AS done,"
                " count(*) FILTER (WHERE outcome = 'failed') AS failed,"
                " coalesce(sum(deliveries - 1), 0) AS suppressed,"
                " coalesce(sum(greatest(attempts - 1, 0)), 0) AS retried"
                " FROM webhook_events WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        ).one()
        found = conn.execute(
            text(
                "SELECT count(*) FROM webhook_events WHERE id = ANY(:ids) AND outcome <> 'queued'"
            ),
            {"ids": ids},
        ).scalar_one()
        doubled = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT event_id, entity, entity_id FROM refund_history"
                " WHERE event_id = ANY(:ids) GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
            ),
            {"ids": ids},
        ).scalar_one()
    return Tally(
        sent=len(ids),
        applied=int(row.done),
        lost=len(ids) - int(found),
        doubled=int(doubled),
        suppressed=int(row.suppressed),
        retried=int(row.retried),
        failed=int(row.failed),
    )


def summaries(engine: Engine, order_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored orders' summaries, without what depends on arrival (eventgen.comparable)."""
    from models.views import order_summary

    with engine.connect() as conn:
        found = {order_id: order_summary(conn, order_id) for order_id in order_ids}
    return {k: eventgen.comparable(s) for k, s in found.items() if s}


@dataclass
class Stack:
    """A running refundsync: ingest, two single-process workers, its database and broker."""

    base: str
    db_url: str
    redis: RedisServer
    engine: Engine
    env: dict[str, str]
    processes: list[Process]

    def api(self, path: str) -> httpx.Response:
        return httpx.get(
            f"{self.base}{path}",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=10,
        )


class EventTap(threading.Thread):
    """Every publish on Celery's event exchange, with the task events it carries."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.pubsub = redis_client.Redis.from_url(url).pubsub()
        self.pubsub.psubscribe("*celeryev*")
        self.publishes: list[tuple[float, list[dict[str, Any]]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if not message or message["type"] != "pmessage":
                continue
            envelope = json.loads(message["data"])
            body = json.loads(base64.b64decode(envelope["body"]))
            events = body if isinstance(body, list) else [body]
            tasks = [e for e in events if str(e.get("type", "")).startswith("task-")]
            if tasks:
                self.publishes.append((time.monotonic(), tasks))

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.pubsub.close()


def sealed_copy(
    engine: Engine, event: Mapping[str, Any], message: str, *, redelivered: bool = False
) -> Any:
    """The copy a worker's processing gets from an events.apply message carrying `event`,
    sealed with the database's newest queue key (worker.processing.Copy)."""
    from worker import processing
    from worker.queue.contract import apply_args

    with engine.connect() as conn:
        key = trust.load_keys(conn)[0]
    args = apply_args(key, json.dumps(event), datetime.now(UTC).isoformat(), "webhook")
    return processing.copy_of({"redelivered": redelivered}, message, *args)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    text = httpx.get(url, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total

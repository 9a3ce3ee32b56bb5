"""The standalone mode: `refundsync run` with no DATABASE_URL and no REDIS_URL, on SQLite
files in its data directory, through real subprocesses."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import deadlines, eventgen, factories, support

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    """The environment of a developer who has set nothing of refundsync's."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DR_", "REFUNDSYNC_", "DATABASE_URL", "REDIS_URL"))
    }
    if support.SCRATCH is not None:
        env["TMPDIR"] = str(support.SCRATCH)  # removed at the session's end
    env.update(REFUNDSYNC_METRICS_ADDR="", PYTHONUNBUFFERED="1", **extra)
    return env


class Run:
    """A `refundsync run` (or any command) in its own process group, output in a file."""

    def __init__(self, command: list[str], env: Mapping[str, str], cwd: Path | None = None):
        self.log_path = Path(tempfile.mkstemp(prefix="refundsync-standalone-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        support.RUNNING_LOGS[self.log_path] = "refundsync run"
        self.proc = subprocess.Popen(
            command,
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        def seen() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited early:\n{self.log()[-4000:]}")
            return re.search(pattern, self.log())

        found: re.Match[str] = support.wait_for(seen, timeout=timeout, what=pattern)
        return found

    def stop(self) -> int:
        """Ctrl-C, as a developer would; returns the exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                raise
        self._log.close()
        support.RUNNING_LOGS.pop(self.log_path, None)
        return self.proc.returncode


class Standalone:
    """`refundsync run --dev-secret` on a data directory, on a free port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = support.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.run: Run | None = None

    def start(self, timeout: float = deadlines.PROCESS_START_S) -> Standalone:
        command = [sys.executable, "-m", "worker.cli", "run", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), "--dev-secret"]
        self.run = Run(command, _env(REFUNDSYNC_API_TOKEN=support.API_TOKEN), cwd=ROOT)
        self.run.wait_for_line(r"webhook URL \S+", timeout=timeout)
        self.run.wait_for_line(r"refundsync order show", timeout=timeout)
        return self

    @property
    def secret(self) -> str:
        return (self.data_dir / "dev-webhook-secret").read_text().strip()

    def post(self, body: bytes) -> int:
        headers = support.signed_headers(body, secret=self.secret)
        url = f"{self.base}/webhooks/digital-river"
        return httpx.post(url, content=body, headers=headers, timeout=30).status_code

    def api(self, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {support.API_TOKEN}"}
        return httpx.get(f"{self.base}{path}", headers=headers, timeout=30)

    def outcomes(self, ids: list[str]) -> dict[str, str]:
        with sqlite3.connect(self.data_dir / "refundsync.db", timeout=30) as conn:
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT id, outcome FROM webhook_events WHERE id IN ({marks})",  # noqa: S608
                ids,
            ).fetchall()
        return dict(rows)

    def wait_finished(
        self, ids: list[str], timeout: float = deadlines.STANDALONE_APPLY_S
    ) -> dict[str, str]:
        def done() -> dict[str, str] | None:
            found = self.outcomes(ids)
            finished = len(found) == len(set(ids)) and "queued" not in found.values()
            return found if finished else None

        result: dict[str, str] = support.wait_for(
            done, timeout=timeout, interval=0.2, what=f"{len(ids)} events to finish"
        )
        return result

    def stop(self) -> None:
        if self.run is not None:
            assert self.run.stop() == 0, self.run.log()[-4000:]
            self.run.log_path.unlink(missing_ok=True)
            self.run = None


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="refundsync-data-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def standalone(data_dir: Path) -> Iterator[Standalone]:
    service = Standalone(data_dir).start()
    try:
        yield service
    finally:
        service.stop()


def _refund(order_id: str, refund_id: str, kind: str, state: str, created: str) -> dict[str, Any]:
    return factories.refund_event(
        order_id,
        state=state,
        amount=27.1,
        refund_id=refund_id,
        event_type=kind,
        created=created,
        refundedAmount=27.1 if state == "succeeded" else 0.0,
        createdTime=factories.CREATED,
    )


def test_signed_webhooks_apply_with_duplicates_and_out_of_order_delivery(
    standalone: Standalone,
) -> None:
    rng = random.Random(7)
    events = [
        event
        for n in range(6)
        for event in eventgen.order_history(rng, f"sa-{uuid.uuid4().hex[:8]}-{n}", 10)
    ]
    deliveries = [json.dumps(event).encode() for event in events for _ in range(2)]
    rng.shuffle(deliveries)
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(standalone.post, deliveries)) == [202] * len(deliveries)

    ids = [event["id"] for event in events]
    assert "failed" not in standalone.wait_finished(ids).values()
    for order_id, expected in eventgen.expected_summaries(events).items():
        actual = standalone.api(f"/orders/{order_id}").json()
        assert eventgen.comparable(actual) == expected, order_id

    def both_copies_counted() -> bool:
        records = [standalone.api(f"/events/{event_id}").json() for event_id in ids]
        return {record["deliveries"] for record in records} == {2}

    support.wait_for(
        both_copies_counted,
        timeout=deadlines.STANDALONE_APPLY_S,
        interval=0.5,
        what="2 deliveries each",
    )


def test_the_printed_lines_send_the_example_and_read_its_order(standalone: Standalone) -> None:
    assert standalone.run is not None
    log = standalone.run.log()
    send = re.search(r"refundsync:   (.+ sign .+)", log)
    then = re.search(r"refundsync: then: (.+)", log)
    assert send, log[-3000:]
    assert then, log[-3000:]
    posted = subprocess.run(
        ["bash", "-c", send.group(1)], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(posted.stdout)["status"] == "queued"
    example = json.loads((standalone.data_dir / "example-event.json").read_text())
    assert standalone.wait_finished([example["id"]]) == {example["id"]: "applied"}
    shown = subprocess.run(
        ["bash", "-c", then.group(1)], capture_output=True, text=True, timeout=60, check=True
    )
    summary = json.loads(shown.stdout)
    assert summary["orderId"] == example["data"]["object"]["orderId"]
    assert summary["pendingRefundAmount"] == "10.00"


def test_complete_before_pending_ends_succeeded_with_pending_stale(
    standalone: Standalone,
) -> None:
    order_id, refund_id = f"sa-{uuid.uuid4().hex[:8]}", f"re_{uuid.uuid4()}"
    complete = _refund(order_id, refund_id, "refund.complete", "succeeded", "2024-05-14T18:00:00Z")
    pending = _refund(order_id, refund_id, "refund.pending", "pending", "2024-05-14T10:00:01Z")
    assert standalone.post(json.dumps(complete).encode()) == 202
    standalone.wait_finished([complete["id"]])
    assert standalone.post(json.dumps(pending).encode()) == 202

    assert standalone.wait_finished([pending["id"]]) == {pending["id"]: "stale"}
    summary = standalone.api(f"/orders/{order_id}").json()
    assert [(r["state"], r["amount"]) for r in summary["refunds"]] == [("succeeded", "27.10")]
    assert summary["refundedAmount"] == "27.10"
    # Stored as the exact decimal text, not as a float that happens to round back.
    with sqlite3.connect(standalone.data_dir / "refundsync.db") as conn:
        stored = conn.execute(
            "SELECT typeof(amount), amount FROM refunds WHERE order_id = ?", (order_id,)
        ).fetchall()
    assert stored == [("text", "27.10")]


def test_a_bad_signature_is_refused_and_nothing_is_queued(standalone: Standalone) -> None:
    body = json.dumps(_refund("sa-x", "re_x", "refund.pending", "pending", "2024-05-14T10:00:00Z"))
    response = httpx.post(
        f"{standalone.base}/webhooks/digital-river",
        content=body,
        headers=support.signed_headers(body.encode(), secret="whsec_wrong"),
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["error"]
    ready = standalone.api("/readyz")
    assert ready.status_code == 200, ready.text
    # A signed event sent after it is applied; the refused one is nowhere, in the queue or
    # in the database (the one worker takes messages in the order they were queued).
    later = _refund("sa-y", "re_y", "refund.pending", "pending", "2024-05-14T10:00:00Z")
    assert standalone.post(json.dumps(later).encode()) == 202
    standalone.wait_finished([later["id"]])
    refused_id = json.loads(body)["id"]
    assert standalone.outcomes([refused_id]) == {}
    assert not any(refused_id in payload for payload in _broker_payloads(standalone.data_dir))


def _queue_without_worker(data_dir: Path, bodies: list[bytes], secret: str) -> None:
    """Queue events with only the ingest running on the standalone files: no worker takes them."""
    port = support.free_port()
    env = _env(
        DATABASE_URL=f"sqlite:///{data_dir / 'refundsync.db'}",
        REDIS_URL=f"refundsync-sqlite+sqlite:///{data_dir / 'broker.db'}",
        DR_WEBHOOK_SECRETS=secret,
    )
    ingest = Run([sys.executable, "-m", "worker.cli", "ingest", "--port", str(port)], env, ROOT)
    try:
        ingest.wait_for_line("Uvicorn running", timeout=deadlines.PROCESS_START_S)
        for body in bodies:
            headers = support.signed_headers(body, secret=secret)
            url = f"http://127.0.0.1:{port}/webhooks/digital-river"
            assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 202
    finally:
        ingest.stop()
        ingest.log_path.unlink(missing_ok=True)


def _broker_payloads(data_dir: Path) -> list[str]:
    """The task arguments of every message in the broker file, decoded."""
    with sqlite3.connect(data_dir / "broker.db", timeout=30) as conn:
        rows = conn.execute("SELECT payload FROM kombu_message").fetchall()
    bodies = []
    for (payload,) in rows:
        message = json.loads(payload)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        bodies.append(body)
    return bodies


def _broker_messages(data_dir: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(data_dir / "broker.db", timeout=30) as conn:
        return conn.execute("SELECT id, visible FROM kombu_message").fetchall()


def test_restart_on_the_same_data_dir_keeps_state_and_queued_events(data_dir: Path) -> None:
    first = Standalone(data_dir).start()
    try:
        order_id, refund_id = f"sa-{uuid.uuid4().hex[:8]}", f"re_{uuid.uuid4()}"
        pending = _refund(order_id, refund_id, "refund.pending", "pending", "2024-05-14T10:00:00Z")
        assert first.post(json.dumps(pending).encode()) == 202
        first.wait_finished([pending["id"]])
        secret = first.secret
    finally:
        first.stop()

    # Queued while no worker runs; one of them as if a worker had taken it and died.
    complete = _refund(order_id, refund_id, "refund.complete", "succeeded", "2024-05-14T12:00:00Z")
    other = _refund(
        f"sa-{uuid.uuid4().hex[:8]}", "re_o", "refund.pending", "pending", "2024-05-14T10:00:00Z"
    )
    _queue_without_worker(data_dir, [json.dumps(e).encode() for e in (complete, other)], secret)
    queued = _broker_messages(data_dir)
    assert len(queued) == 2
    payloads = _broker_payloads(data_dir)
    assert [any(e["id"] in p for p in payloads) for e in (complete, other)] == [True, True]
    with sqlite3.connect(data_dir / "broker.db") as conn:
        conn.execute("UPDATE kombu_message SET visible = 0 WHERE id = ?", (queued[0][0],))

    second = Standalone(data_dir).start()
    try:
        assert second.secret == secret
        assert second.wait_finished([pending["id"], complete["id"], other["id"]]) == {
            pending["id"]: "applied",
            complete["id"]: "applied",
            other["id"]: "applied",
        }
        summary = second.api(f"/orders/{order_id}").json()
        assert [r["state"] for r in summary["refunds"]] == ["succeeded"]
        assert second.api(f"/events/{pending['id']}").json()["outcome"] == "applied"
        # Settled messages leave the broker file.
        support.wait_for(
            lambda: _broker_messages(data_dir) == [],
            timeout=deadlines.STANDALONE_APPLY_S,
            what="acks",
        )
    finally:
        second.stop()


def test_a_worker_that_stops_on_its_own_stops_the_rest_and_fails(data_dir: Path) -> None:
    service = Standalone(data_dir).start()
    assert service.run is not None
    run = service.run
    try:
        # Once Celery has its signal handlers: a worker still starting would die of SIGTERM.
        run.wait_for_line(r"refundsync@\S+ ready\.", timeout=deadlines.PROCESS_START_S)
        found = subprocess.run(
            ["pgrep", "-P", str(run.proc.pid), "-f", "worker.cli worker"],
            capture_output=True,
            text=True,
            check=True,
        )
        # A warm shutdown from outside: the worker itself exits 0.
        os.kill(int(found.stdout.split()[0]), signal.SIGTERM)
        assert run.proc.wait(timeout=60) == 1, run.log()[-4000:]
        assert "refundsync: worker exited with status 0" in run.log()
    finally:
        run.stop()
        run.log_path.unlink(missing_ok=True)


def test_only_one_of_the_urls_set_is_an_error(data_dir: Path) -> None:
    for name, value in (
        ("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "run", "--data-dir", str(data_dir)],
            env=_env(**{name: value}, DR_WEBHOOK_SECRETS="whsec_x"),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert result.returncode == 1
        other = "REDIS_URL" if name == "DATABASE_URL" else "DATABASE_URL"
        assert f"{name} is set but {other} is not" in result.stderr
        assert "Traceback" not in result.stderr


def test_it_refuses_to_start_without_a_secret_unless_asked_for_a_dev_secret(
    data_dir: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--data-dir", str(data_dir)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "DR_WEBHOOK_SECRETS must be set (or pass --dev-secret" in result.stderr
    assert not (data_dir / "refundsync.db").exists()


def _readme_run_command() -> str:
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    block = quick_start.split("```sh", 1)[1].split("```", 1)[0]
    line = next(line for line in block.splitlines() if "run" in line.split("#")[0])
    return line.split("#")[0].strip()


@pytest.mark.timeout(600)
def test_the_readme_run_command_serves_a_signed_webhook_in_a_fresh_directory() -> None:
    command = _readme_run_command()
    home = Path(tempfile.mkdtemp(prefix="refundsync-readme-"))
    checkout = home / "refundsync"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    port = support.free_port()
    env = _env(HOME=str(home), XDG_DATA_HOME=str(home / "data"), PORT=str(port))
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(
        part for part in env.get("PATH", "").split(os.pathsep) if ".venv" not in part
    )
    run = Run(["bash", "-c", command], env, cwd=checkout)
    try:
        secret = run.wait_for_line(r"development webhook secret (\S+)", timeout=480).group(1)
        run.wait_for_line(r"refundsync order show", timeout=deadlines.PROCESS_START_S)
        body = support.load_fixture("dr_examples/04_refund_complete.json")
        headers = support.signed_headers(body, secret=secret)
        url = f"http://127.0.0.1:{port}/webhooks/digital-river"
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 202
        database = home / "data" / "refundsync" / "refundsync.db"
        event_id = json.loads(body)["id"]

        def applied() -> bool:
            with sqlite3.connect(database, timeout=30) as conn:
                row = conn.execute(
                    "SELECT outcome FROM webhook_events WHERE id = ?", (event_id,)
                ).fetchone()
            return row is not None and row[0] == "applied"

        try:
            support.wait_for(
                applied, timeout=deadlines.STANDALONE_APPLY_S, what="the example event applied"
            )
        except TimeoutError:
            raise AssertionError(run.log()[-6000:]) from None
    finally:
        # Ctrl-C: make reports the interrupt by dying of it, as a shell expects.
        code = run.stop()
        log = run.log()
        run.log_path.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
    assert code in (0, -signal.SIGINT), log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert "exited with status" not in log, log[-4000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)

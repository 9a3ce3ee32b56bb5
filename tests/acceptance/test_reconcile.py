"""Reconciliation against a fake DR API on a real socket: events lost by the broker or
never delivered by DR are found in DR's Events API and applied once; DR's rate limits and
failures are survived; a bad page stops the run without moving the checkpoint; two runs
at once publish once; and the drift check reports orders whose refunds differ from DR's."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from models.rules import HANDLED_EVENTS
from tests import deadlines, eventgen, factories, support
from tests.fake_dr import API_KEY, NORMAL, FakeDR, malformed, server_error, slow, too_many
from tests.support import Stack
from worker.reconcile.dr_api import (
    DRApiMalformed,
    DRApiRefused,
    DRApiUnavailable,
    DRClient,
    EventPage,
    RetryPolicy,
    Timeouts,
)
from worker.reconcile.plan import LISTED_TYPES, listed_by

pytestmark = pytest.mark.slow

FAST = RetryPolicy(attempts=4, backoff_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def no_checkpoint(database: support.Database) -> None:
    """Each test starts as a fresh install would: without a checkpoint."""
    engine = support.engine_for(database.url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM reconcile_checkpoints"))
    finally:
        engine.dispose()


def _history(seed: int, orders: int, per_order: int, newest: datetime) -> list[dict[str, Any]]:
    """Orders' event histories, re-timed one second apart so the newest is `newest`: DR's
    Events API only has the last 30 days. Order within each history is kept."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for _ in range(orders):
        order_id = f"ord-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}"
        events.extend(eventgen.order_history(rng, order_id, per_order))
    first = newest - timedelta(seconds=len(events) - 1)
    for index, event in enumerate(events):
        created = first + timedelta(seconds=index, microseconds=rng.randint(0, 999_999))
        event["createdTime"] = created.isoformat().replace("+00:00", "Z")
    return events


def _order_ids(events: list[dict[str, Any]]) -> list[str]:
    return sorted({e["data"]["object"].get("orderId") or e["data"]["object"]["id"] for e in events})


def _handled(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] in HANDLED_EVENTS]


def _pages(events: list[dict[str, Any]]) -> int:
    """The requests that list `events` (of one slice): per listing, a page of 100 or part
    of one, and one for an empty listing."""
    return sum(
        max(1, math.ceil(sum(listed_by(group, e["type"]) for e in events) / 100))
        for group in LISTED_TYPES
    )


def _env(base: dict[str, str], fake: FakeDR, **extra: str) -> dict[str, str]:
    return {**base, "DR_API_KEY": fake.api_key, "DR_API_BASE_URL": fake.url, **extra}


def _reconcile(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return support.run_cli(env, "reconcile", *args)


def _summary(stdout: str) -> dict[str, str]:
    """The key=value fields of the `reconcile: ...` summary line."""
    [line] = [line for line in stdout.splitlines() if line.startswith("reconcile")]
    return dict(part.split("=", 1) for part in line.split(": ", 1)[1].split())


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def _checkpoint(engine: Engine) -> datetime | None:
    with engine.connect() as conn:
        value: datetime | None = conn.execute(
            text("SELECT position FROM reconcile_checkpoints WHERE name = 'events'")
        ).scalar_one_or_none()
    return value


def _set_checkpoint(engine: Engine, position: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO reconcile_checkpoints (name, position) VALUES ('events', :p)"
                " ON CONFLICT (name) DO UPDATE SET position = :p"
            ),
            {"p": position},
        )


def _rows(engine: Engine, ids: list[str]) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, source, deliveries, outcome FROM webhook_events WHERE id = ANY(:ids)"),
            {"ids": ids},
        )
        return {row.id: row for row in rows}


def _now() -> datetime:
    return datetime.now(UTC)


def _print_logs(processes: list[support.Process]) -> None:
    """Show the private processes' logs in the report of a failed test."""
    for process in processes:
        print(f"--- log of {process.name} ---\n{process.log()[-6000:]}")


# ---------------------------------------------------------------------------------------
# The broker lost what the ingest accepted


def test_events_accepted_then_flushed_from_the_broker_are_all_applied_by_one_run(
    database: support.Database, fake: FakeDR, no_checkpoint: None
) -> None:
    events = _history(seed=1001, orders=100, per_order=10, newest=_now() - timedelta(minutes=2))
    fake.set_events(events)
    handled = _handled(events)
    ids = [e["id"] for e in handled]
    redis = support.RedisServer().start()
    env = _env(support.service_env(database.url, redis.url), fake)
    engine = support.engine_for(database.url)
    processes: list[support.Process] = []
    try:
        ingest, base = support.start_ingest(env)
        processes.append(ingest)
        with httpx.Client(timeout=10) as http:
            for event in events:
                body = json.dumps(event).encode()
                answer = http.post(
                    f"{base}/webhooks/digital-river",
                    content=body,
                    headers=support.signed_headers(body),
                )
                assert answer.status_code == 202, answer.text
        assert redis.cli("LLEN", "refundsync") == str(len(events))
        # The broker loses everything before any worker ran.
        assert redis.cli("FLUSHALL") == "OK"
        assert _rows(engine, ids) == {}
        processes.extend(support.start_worker(env, name, concurrency=2) for name in ("r1", "r2"))

        first = _reconcile(env)
        assert first.returncode == 0, first.stderr[-3000:]
        summary = _summary(first.stdout)
        assert summary["listed"] == str(len(handled))
        assert summary["published"] == str(len(handled))
        assert summary["already_done"] == "0"
        # A fresh install lists all 30 days DR keeps: a call per listing per day, and per
        # page of 100 on the last day, where these events are.
        pages = _pages(events)
        empty_days = 29 * len(LISTED_TYPES)
        assert summary["api_calls"] == str(empty_days + pages) == str(len(fake.event_requests()))
        # Each listing names one `type` filter, as DR's OpenAPI file defines it.
        asked = [seen.query for seen in fake.event_requests()]
        assert {query["type"][0] for query in asked} == set(LISTED_TYPES)
        assert all(len(query["type"]) == 1 and "types" not in query for query in asked)

        support.wait_finished(engine, ids, timeout=deadlines.APPLY_S)
        result = support.tally(engine, ids)
        assert (result.lost, result.doubled, result.failed) == (0, 0, 0)
        rows = _rows(engine, ids)
        assert {row.source for row in rows.values()} == {"reconcile"}
        assert {row.deliveries for row in rows.values()} == {1}
        order_ids = _order_ids(events)
        assert support.summaries(engine, order_ids) == eventgen.expected_summaries(events)
        newest = max(datetime.fromisoformat(e["createdTime"]) for e in handled)
        assert _checkpoint(engine) == newest

        calls_before = len(fake.event_requests())
        second = _reconcile(env)
        assert second.returncode == 0, second.stderr[-3000:]
        again = _summary(second.stdout)
        assert again["published"] == "0"
        assert again["already_done"] == again["listed"] == str(len(handled))
        # From the checkpoint minus the hour of overlap: one slice, these events' pages.
        assert again["api_calls"] == str(pages) == str(len(fake.event_requests()) - calls_before)
        assert {row.deliveries for row in _rows(engine, ids).values()} == {1}
    except BaseException:
        _print_logs(processes)
        raise
    finally:
        for process in processes:
            process.stop()
        engine.dispose()
        redis.cleanup()


# ---------------------------------------------------------------------------------------
# DR never delivered some events


def test_events_dr_never_delivered_are_applied_after_a_reconcile(
    stack: Stack, fake: FakeDR, no_checkpoint: None
) -> None:
    events = _history(seed=2002, orders=4, per_order=12, newest=_now() - timedelta(minutes=1))
    delivered = events[::2]
    never = [e for e in events[1::2] if e["type"] in HANDLED_EVENTS]
    for event in delivered:
        assert support.post_event(stack.base, event).status_code == 202
    support.wait_finished(stack.engine, [e["id"] for e in delivered])
    fake.set_events(events)

    result = _reconcile(_env(stack.env, fake))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(result.stdout)
    assert summary["published"] == str(len(never))
    assert summary["already_done"] == str(len(_handled(delivered)))

    support.wait_finished(stack.engine, [e["id"] for e in events])
    rows = _rows(stack.engine, [e["id"] for e in events])
    assert {rows[e["id"]].source for e in never} == {"reconcile"}
    assert {rows[e["id"]].source for e in delivered} == {"webhook"}
    order_ids = _order_ids(events)
    assert support.summaries(stack.engine, order_ids) == eventgen.expected_summaries(events)
    assert stack.api(f"/events/{never[0]['id']}").json()["deliveries"] == 1


def test_beat_reconciles_on_its_interval_when_a_key_is_set(
    database: support.Database, fake: FakeDR, no_checkpoint: None, tmp_path: Path
) -> None:
    events = _history(seed=3003, orders=2, per_order=6, newest=_now() - timedelta(minutes=1))
    fake.set_events(events)
    redis = support.RedisServer().start()
    env = _env(
        support.service_env(database.url, redis.url),
        fake,
        REFUNDSYNC_RECONCILE_INTERVAL_SECONDS="1",
    )
    engine = support.engine_for(database.url)
    processes: list[support.Process] = []
    try:
        worker = support.start_worker(env, "beatw")
        processes.append(worker)
        beat = support.Process("beat", ["beat", "--schedule", str(tmp_path / "schedule")], env)
        processes.append(beat)
        beat.wait_for_log("reconcile.enabled")
        found = support.wait_finished(
            engine, [e["id"] for e in _handled(events)], timeout=deadlines.APPLY_S
        )
        assert set(found.values()) <= {"applied", "stale", "ignored"}
        assert "reconcile.enabled" in worker.log()
        assert "reconcile.published" in worker.log()
        assert fake.url in beat.log()
        assert API_KEY not in beat.log() + worker.log()
        assert _checkpoint(engine) is not None
    except BaseException:
        _print_logs(processes)
        raise
    finally:
        for process in processes:
            process.stop()
        engine.dispose()
        redis.cleanup()


def test_without_a_key_reconciliation_is_off_and_says_so(stack: Stack, tmp_path: Path) -> None:
    beat = support.Process("beat", ["beat", "--schedule", str(tmp_path / "schedule")], stack.env)
    try:
        beat.wait_for_log("reconcile.disabled")
        assert "DR_API_KEY not set" in beat.log()
    finally:
        beat.stop()
    workers = [process for process in stack.processes if process.name.startswith("worker")]
    assert workers
    assert all("reconcile.disabled" in worker.log() for worker in workers)
    result = _reconcile(stack.env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "refundsync: reconciliation is off: DR_API_KEY is not set (see docs/reconciliation.md)"
    )
    assert _reconcile(stack.env, "--since", "last tuesday").returncode == 2


# ---------------------------------------------------------------------------------------
# DR's API misbehaving


def _last_hour(client: DRClient) -> list[EventPage]:
    now = _now()
    return list(
        client.list_events("refund.pending", created_gte=now - timedelta(hours=1), created_lt=now)
    )


def test_client_waits_what_retry_after_asks_then_succeeds(fake: FakeDR) -> None:
    fake.script(too_many("1"))
    with DRClient(fake.url, API_KEY, retry=FAST) as client:
        assert len(_last_hour(client)) == 1
        assert client.calls == 2
    first, second = fake.event_requests()
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0
    assert first.authorization == second.authorization == f"Bearer {API_KEY}"
    assert second.query["createdTime[gte]"][0].endswith("Z")
    assert second.query["limit"] == ["100"]


def test_client_retries_server_errors_and_timeouts_then_gives_up(fake: FakeDR) -> None:
    fake.script(server_error(), slow(1.0), server_error())
    with DRClient(fake.url, API_KEY, retry=FAST, timeouts=Timeouts(read=0.3)) as client:
        assert len(_last_hour(client)) == 1
    assert len(fake.event_requests()) == 4

    fake.script(*[server_error()] * 10)
    with (
        DRClient(fake.url, API_KEY, retry=FAST) as client,
        pytest.raises(
            DRApiUnavailable,
            match=r"^GET /events\?type=refund\.pending page 1: HTTP 500 after 4 tries$",
        ),
    ):
        _last_hour(client)

    fake.script(too_many("3600"))
    with DRClient(fake.url, API_KEY, retry=FAST) as client:
        with pytest.raises(DRApiUnavailable, match="asking to wait 3600 s"):
            _last_hour(client)
        assert client.calls == 1


def test_client_does_not_retry_a_refusal(fake: FakeDR) -> None:
    with DRClient(fake.url, "sk_wrong", retry=FAST) as client:
        with pytest.raises(DRApiRefused, match="HTTP 401: invalid API key"):
            client.get_order("241500010336")
        assert client.calls == 1
    fake.script(malformed(b"<html>maintenance</html>"))
    with DRClient(fake.url, API_KEY, retry=FAST) as client:
        with pytest.raises(DRApiMalformed, match="GET /orders/x: the answer is not JSON"):
            client.get_order("x")
        assert client.get_order("unknown") is None


def test_a_run_through_429_and_500_answers_publishes_everything(
    stack: Stack, fake: FakeDR, no_checkpoint: None
) -> None:
    events = _history(seed=5005, orders=15, per_order=10, newest=_now() - timedelta(minutes=1))
    fake.set_events(events)
    _set_checkpoint(stack.engine, _now() - timedelta(hours=2))
    assert 100 < len(_handled(events)) <= 200
    # The first request is rate limited once, the second fails once.
    fake.script(too_many("1"), NORMAL, server_error())
    result = _reconcile(_env(stack.env, fake))
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = [seen.status for seen in fake.event_requests()]
    assert statuses == [429, 200, 500] + [200] * (_pages(events) - 1)
    summary = _summary(result.stdout)
    assert summary["published"] == str(len(_handled(events)))
    assert summary["api_calls"] == str(len(statuses))
    support.wait_finished(stack.engine, [e["id"] for e in _handled(events)])
    assert support.summaries(stack.engine, _order_ids(events)) == eventgen.expected_summaries(
        events
    )


def test_a_malformed_page_fails_the_run_and_leaves_the_checkpoint(
    stack: Stack, fake: FakeDR, no_checkpoint: None
) -> None:
    events = _history(seed=6006, orders=15, per_order=10, newest=_now() - timedelta(minutes=1))
    fake.set_events(events)
    before = _now() - timedelta(hours=2)
    _set_checkpoint(stack.engine, before)
    assert len(_handled(events)) > 100
    page = b'{"hasMore": true, "data": [{"id": "x", "type": "refund.pending"}]}'
    fake.script(NORMAL, malformed(page))
    result = _reconcile(_env(stack.env, fake))
    assert result.returncode == 1
    # The second request: the first listing's second page, or the second listing.
    second = fake.event_requests()[1].query
    where = f"GET /events?type={second['type'][0]} page {2 if 'startingAfter' in second else 1}"
    assert _last_line(result.stderr) == (
        f"refundsync: reconcile failed: {where}: data[0].createdTime is missing or"
        f" not an ISO time; checkpoint stays at {before.isoformat().replace('+00:00', 'Z')}"
    )
    assert _checkpoint(stack.engine) == before

    # The next run, with DR answering properly again, finishes the job.
    result = _reconcile(_env(stack.env, fake))
    assert result.returncode == 0, result.stderr[-3000:]
    support.wait_finished(stack.engine, [e["id"] for e in _handled(events)])
    assert _checkpoint(stack.engine) == max(
        datetime.fromisoformat(e["createdTime"]) for e in _handled(events)
    )


# ---------------------------------------------------------------------------------------
# Two reconcilers at once


def test_two_runs_started_together_publish_each_missing_event_once(
    stack: Stack, fake: FakeDR, no_checkpoint: None
) -> None:
    events = _history(seed=7007, orders=25, per_order=10, newest=_now() - timedelta(minutes=1))
    fake.set_events(events)
    _set_checkpoint(stack.engine, _now() - timedelta(hours=1))
    # The first page is slow, so whichever run gets there first still holds the lock when
    # the other one starts.
    fake.script(slow(2.0))
    env = _env(stack.env, fake)
    command = [sys.executable, "-m", "worker.cli", "reconcile"]
    runs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    stdouts = sorted(out for out, _ in outputs)
    busy = [out for out in stdouts if "another reconcile is running" in out]
    done = [out for out in stdouts if "published=" in out]
    assert len(busy) == 1, stdouts
    assert len(done) == 1, stdouts
    handled = _handled(events)
    assert _summary(done[0])["published"] == str(len(handled))
    # Only one run listed: one slice, each listing once.
    assert len(fake.event_requests()) == _pages(events)

    support.wait_finished(stack.engine, [e["id"] for e in handled])
    rows = _rows(stack.engine, [e["id"] for e in handled])
    assert {row.deliveries for row in rows.values()} == {1}
    assert support.tally(stack.engine, [e["id"] for e in handled]).doubled == 0


def test_a_run_right_after_another_leaves_what_it_published_to_its_messages(
    database: support.Database, fake: FakeDR, no_checkpoint: None
) -> None:
    events = _history(seed=8008, orders=3, per_order=6, newest=_now() - timedelta(minutes=1))
    handled = _handled(events)
    ids = [e["id"] for e in handled]
    fake.set_events(events)
    # A broker no worker reads yet: what a run publishes stays queued there.
    redis = support.RedisServer().start()
    env = _env(support.service_env(database.url, redis.url), fake)
    engine = support.engine_for(database.url)
    try:
        dry = _reconcile(env, "--dry-run")
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert _summary(dry.stdout)["would_publish"] == str(len(handled))
        assert _rows(engine, ids) == {}
        assert _checkpoint(engine) is None

        first = _reconcile(env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert _summary(first.stdout)["published"] == str(len(handled))
        rows = _rows(engine, ids)
        assert {(r.source, r.outcome, r.deliveries) for r in rows.values()} == {
            ("reconcile", "queued", 0)
        }
        second = _reconcile(env)
        assert second.returncode == 0, second.stderr[-3000:]
        summary = _summary(second.stdout)
        assert (summary["published"], summary["in_flight"]) == ("0", str(len(handled)))
        assert redis.cli("LLEN", "refundsync") == str(len(handled))

        worker = support.start_worker(env, "late")
        try:
            support.wait_finished(engine, ids)
        except BaseException:
            _print_logs([worker])
            raise
        finally:
            worker.stop()
        assert {row.deliveries for row in _rows(engine, ids).values()} == {1}
    finally:
        engine.dispose()
        redis.cleanup()


# ---------------------------------------------------------------------------------------
# Drift


def _refund_complete(order_id: str, amount: float) -> dict[str, Any]:
    return factories.refund_event(
        order_id,
        state="succeeded",
        amount=amount,
        created=_now().isoformat().replace("+00:00", "Z"),
        refundedAmount=amount,
    )


def _dr_order(order_id: str, refunded: float) -> dict[str, Any]:
    return {
        "id": order_id,
        "currency": "USD",
        "totalAmount": 54.02,
        "refundedAmount": refunded,
        "availableToRefundAmount": 54.02 - refunded,
        "state": "complete",
    }


def test_drift_check_reports_an_order_whose_dr_figure_differs(
    stack: Stack, fake: FakeDR, tmp_path: Path
) -> None:
    with stack.engine.connect() as conn:
        since = conn.execute(text("SELECT now()")).scalar_one()
    drifted, agreed = f"ord-{uuid.uuid4().hex[:10]}", f"ord-{uuid.uuid4().hex[:10]}"
    posted = [_refund_complete(drifted, 27.01), _refund_complete(agreed, 10.0)]
    for event in posted:
        assert support.post_event(stack.base, event).status_code == 202
    support.wait_finished(stack.engine, [e["id"] for e in posted])
    fake.orders = {drifted: _dr_order(drifted, 54.02), agreed: _dr_order(agreed, 10.0)}
    env = _env(stack.env, fake)
    metrics = tmp_path / "drift.prom"
    args = ["--check-orders", "--since", since.isoformat(), "--metrics-file", str(metrics)]

    result = _reconcile(env, *args)
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        f"drift order={drifted} currency=USD refundedAmount=27.01 dr=54.02"
    )
    assert "checked=2 mismatched=1" in result.stdout
    assert agreed not in result.stdout
    assert _last_line(result.stderr) == "refundsync: 1 of 2 orders differ from DR"
    assert "refundsync_reconcile_drift_orders 1.0" in metrics.read_text()

    fake.orders[drifted] = _dr_order(drifted, 27.01)
    result = _reconcile(env, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checked=2 mismatched=0" in result.stdout
    assert "refundsync_reconcile_drift_orders 0.0" in metrics.read_text()

    del fake.orders[drifted]
    result = _reconcile(env, *args)
    assert result.returncode == 1
    assert f"drift order={drifted} currency=USD refundedAmount=27.01 dr=not found" in result.stdout

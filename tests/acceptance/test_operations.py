"""What operators see: Flower, Prometheus metrics and logs, on real processes.

A stack of its own: an ingest with two processes (so metrics must add up across them), a
worker with two pool processes serving its metrics, and Flower. The events carry customer
emails and addresses, which must not appear in Flower, in logs or in metrics.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from tests import deadlines, support

_metric = support.metric

EMAIL = "jane.doe+refund@example.com"
STREET = "221B Baker Street"
NAME = "Jane Q. Customer"
SECRET_VALUES = [EMAIL, STREET, NAME, support.SECRET, support.OTHER_SECRET, support.API_TOKEN]
FLOWER_AUTH = ("operator", "flower-pass")


@dataclass
class Observed:
    ingest_base: str
    worker_metrics: str
    flower_base: str
    processes: list[support.Process]
    events: list[dict[str, Any]]
    order_id: str


def _customer() -> dict[str, Any]:
    address = {"line1": STREET, "city": "London", "postalCode": "NW1 6XE", "country": "GB"}
    return {
        "email": EMAIL,
        "billTo": {"name": NAME, "email": EMAIL, "address": address},
        "shipTo": {"name": NAME, "address": address},
    }


def _events(order_id: str) -> list[dict[str, Any]]:
    refund_id = f"re_{uuid.uuid4()}"

    def refund(state: str, kind: str, created: str) -> dict[str, Any]:
        obj = {
            "id": refund_id,
            "orderId": order_id,
            "currency": "USD",
            "amount": 12.0,
            "refundedAmount": 12.0 if state == "succeeded" else 0.0,
            "state": state,
            "metadata": {"customerEmail": EMAIL, "note": f"ship to {STREET}"},
        }
        return {
            "id": str(uuid.uuid4()),
            "type": kind,
            "createdTime": created,
            "liveMode": False,
            "data": {"object": obj},
        }

    order = {
        "id": order_id,
        "currency": "USD",
        "totalAmount": 40.0,
        "refundedAmount": 12.0,
        "availableToRefundAmount": 28.0,
        **_customer(),
    }
    return [
        refund("pending", "refund.pending", "2024-05-14T10:00:00Z"),
        refund("succeeded", "refund.complete", "2024-05-14T12:00:00Z"),
        {
            "id": str(uuid.uuid4()),
            "type": "order.refunded",
            "createdTime": "2024-05-14T12:01:00Z",
            "liveMode": False,
            "data": {"object": order},
        },
        {
            "id": str(uuid.uuid4()),
            "type": "order.accepted",
            "createdTime": "2024-05-14T12:02:00Z",
            "liveMode": False,
            "data": {"object": order},
        },
    ]


@pytest.fixture(scope="module")
def observed(database: support.Database) -> Iterator[Observed]:
    redis = support.RedisServer().start()
    env = support.service_env(database.url, redis.url)
    processes: list[support.Process] = []
    engine = support.engine_for(database.url)
    try:
        port = support.free_port()
        ingest = support.Process("ingest", ["ingest", "--port", str(port), "--workers", "2"], env)
        processes.append(ingest)
        base = f"http://127.0.0.1:{port}"
        support.wait_for(
            lambda: _up(f"{base}/healthz"), timeout=deadlines.PROCESS_START_S, what="ingest"
        )
        metrics_port = support.free_port()
        worker = support.Process(
            "worker-ops",
            ["worker", "--concurrency", "2", "--hostname", "ops@%h"],
            {**env, "REFUNDSYNC_METRICS_ADDR": f"127.0.0.1:{metrics_port}"},
        )
        processes.append(worker)
        worker.wait_for_log("ready.", timeout=deadlines.PROCESS_START_S)
        flower_port = support.free_port()
        flower = support.Process(
            "flower",
            [
                "-m",
                "celery",
                "-A",
                "worker.app",
                "flower",
                "--address=127.0.0.1",
                f"--port={flower_port}",
                f"--basic-auth={':'.join(FLOWER_AUTH)}",
            ],
            env,
            module=False,
        )
        processes.append(flower)
        flower_base = f"http://127.0.0.1:{flower_port}"
        support.wait_for(
            lambda: _up(f"{flower_base}/healthcheck"),
            timeout=deadlines.PROCESS_START_S,
            what="flower",
        )
        order_id = f"ord-{uuid.uuid4().hex[:10]}"
        events = _events(order_id)
        for event in events:
            # One at a time: with two pool processes a later event could overtake an earlier
            # one, and the earlier would then be stale instead of applied.
            assert support.post_event(base, event).status_code == 202
            support.wait_finished(engine, [event["id"]])
        # A duplicate copy and a refused signature, so those counters move too.
        assert support.post_event(base, events[0]).status_code == 202
        assert support.post_event(base, events[0], secret="wrong").status_code == 401
        support.wait_for(
            lambda: (
                _metric(
                    f"http://127.0.0.1:{metrics_port}/metrics",
                    "refundsync_events_total",
                    outcome="duplicate",
                )
                >= 1
            ),
            timeout=30,
            what="the duplicate to be counted",
        )
        yield Observed(
            base,
            f"http://127.0.0.1:{metrics_port}/metrics",
            flower_base,
            processes,
            events,
            order_id,
        )
    finally:
        for process in processes:
            process.stop()
        engine.dispose()
        redis.cleanup()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def _flower(observed: Observed, path: str) -> httpx.Response:
    response = httpx.get(f"{observed.flower_base}{path}", auth=FLOWER_AUTH, timeout=10)
    assert response.status_code == 200, (path, response.status_code)
    return response


def test_flower_lists_the_worker_and_tasks_by_event_id_and_type(observed: Observed) -> None:
    assert "ops@" in " ".join(_flower(observed, "/api/workers?refresh=1").json())
    tasks = _flower(observed, "/api/tasks").json()
    shown = {task["args"] for task in tasks.values() if task["name"] == "events.apply"}
    for event in observed.events:
        assert repr((event["id"], event["type"])) in shown


def test_flower_needs_its_password(observed: Observed) -> None:
    assert httpx.get(f"{observed.flower_base}/api/workers", timeout=5).status_code == 401


def test_flower_never_shows_customer_data(observed: Observed) -> None:
    tasks = _flower(observed, "/api/tasks").json()
    pages = [
        json.dumps(tasks),
        _flower(observed, "/api/workers?refresh=1").text,
        _flower(observed, "/tasks").text,
    ]
    pages += [_flower(observed, f"/api/task/info/{task_id}").text for task_id in tasks]
    pages += [_flower(observed, f"/task/{task_id}").text for task_id in tasks]
    for page in pages:
        for value in SECRET_VALUES:
            assert value not in page


def test_ingest_metrics_add_up_across_its_processes(observed: Observed) -> None:
    url = f"{observed.ingest_base}/metrics"
    sent = len(observed.events) + 1
    assert _metric(url, "refundsync_webhooks_received_total", code="202") == sent
    assert _metric(url, "refundsync_webhooks_received_total", code="401") == 1
    assert _metric(url, "refundsync_signature_failures_total") == 1
    assert _metric(url, "refundsync_ingest_seconds_count") == sent + 1
    assert _metric(url, "refundsync_queue_depth") == 0
    assert _metric(url, "refundsync_failed_events") >= 0
    # No beat runs here to sweep the journal: every accepted event is still in it.
    assert _metric(url, "refundsync_journal_entries") == len({e["id"] for e in observed.events})
    assert _metric(url, "refundsync_journal_oldest_entry_age_seconds") > 0


def test_state_gauges_move_with_the_database(
    observed: Observed, database: support.Database
) -> None:
    url = f"{observed.ingest_base}/metrics"
    engine = support.engine_for(database.url)
    stuck = {"id": f"stuck-{uuid.uuid4()}", "type": "refund.pending"}
    before = _metric(url, "refundsync_failed_events")
    try:
        with engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(
                text(
                    "INSERT INTO webhook_events (id, type, payload, outcome, received_at) VALUES"
                    " (:id, :type, '{}', 'queued', now() - interval '7 minutes'),"
                    " (:failed, :type, '{}', 'failed', now())"
                ),
                {"id": stuck["id"], "type": stuck["type"], "failed": f"{stuck['id']}-f"},
            )
        assert _metric(url, "refundsync_oldest_unfinished_event_age_seconds") >= 400
        assert _metric(url, "refundsync_failed_events") == before + 1
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM webhook_events WHERE id LIKE 'stuck-%'"))
        engine.dispose()


def test_worker_metrics_count_outcomes_and_ages(observed: Observed) -> None:
    url = observed.worker_metrics
    assert _metric(url, "refundsync_events_total", type="refund.pending", outcome="applied") == 1
    assert _metric(url, "refundsync_events_total", type="refund.complete", outcome="applied") == 1
    assert _metric(url, "refundsync_events_total", type="order.refunded", outcome="applied") == 1
    assert _metric(url, "refundsync_events_total", type="other", outcome="ignored") == 1
    assert _metric(url, "refundsync_events_total", type="refund.pending", outcome="duplicate") == 1
    assert _metric(url, "refundsync_event_apply_age_seconds_count", since="received") == 3
    # DR's createdTime is in 2024: the age since it was created is large.
    assert _metric(url, "refundsync_event_apply_age_seconds_sum", since="dr_created") > 3 * 86400


def test_logs_are_json_lines_with_ids_and_no_customer_data(observed: Observed) -> None:
    text = "\n".join(p.log() for p in observed.processes if p.name != "flower")
    for value in SECRET_VALUES:
        assert value not in text
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    applied = [r for r in records if r.get("message") == "event.applied"]
    assert {r["event_id"] for r in applied} >= {e["id"] for e in observed.events[:3]}
    assert all(r.get("task_id") for r in applied)
    assert all(r["order_id"] == observed.order_id for r in applied)
    worker_log = next(p for p in observed.processes if p.name == "worker-ops").log()
    structured = [line for line in worker_log.splitlines() if line.startswith("{")]
    assert structured
    assert all(json.loads(line)["level"] for line in structured)


def _refused(engine: Engine, event_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM refused_messages WHERE event_id = :i"), {"i": event_id}
        )
        return [dict(row._mapping) for row in rows]


@pytest.mark.parametrize(
    ("route", "seal"),
    [
        pytest.param("async-apply", None, id="async-apply-unsealed"),
        pytest.param("send-task", None, id="send-task-unsealed"),
        pytest.param("async-apply", "v1=" + "A" * 43 + "=", id="async-apply-forged-seal"),
    ],
)
def test_an_event_sent_through_flower_is_refused_and_recorded_never_applied(
    observed: Observed, database: support.Database, route: str, seal: str | None
) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _events(order_id)[1]  # refund.complete: would create the order if applied
    args = [json.dumps(event), "2024-05-14T12:00:00+00:00", "webhook"]
    if seal is not None:
        args.append(seal)
    refused_before = _metric(observed.worker_metrics, "refundsync_messages_refused_total")
    answer = httpx.post(
        f"{observed.flower_base}/api/task/{route}/events.apply",
        json={"args": args},
        auth=FLOWER_AUTH,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    engine = support.engine_for(database.url)
    try:
        support.wait_for(
            lambda: _refused(engine, event["id"]) != [],
            timeout=deadlines.ONE_TASK_S,
            what="the refusal to be recorded",
        )
        [refusal] = _refused(engine, event["id"])
        assert refusal["event_type"] == "refund.complete"
        assert refusal["reason"] in ("not sealed by refundsync", "its seal does not verify")
        with engine.connect() as conn:
            recorded = conn.execute(
                text("SELECT count(*) FROM webhook_events WHERE id = :i"), {"i": event["id"]}
            ).scalar_one()
        assert recorded == 0, "a refused message must not stand in for the real event"
        assert support.summaries(engine, [order_id]) == {}
        support.wait_for(
            lambda: (
                _metric(observed.worker_metrics, "refundsync_messages_refused_total")
                > refused_before
            ),
            timeout=deadlines.ONE_TASK_S,
            what="the refusal to be counted",
        )
        # DR's own copy of the event, through the ingest, is still applied.
        assert support.post_event(observed.ingest_base, event).status_code == 202
        assert support.wait_finished(engine, [event["id"]]) == {event["id"]: "applied"}
    finally:
        engine.dispose()

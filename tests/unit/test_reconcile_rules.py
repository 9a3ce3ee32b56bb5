"""The pure parts of reconciliation: the window, what to publish, where the checkpoint
may move, drift, and reading DR's pages and Retry-After."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from models.outcome import Outcome
from models.payloads import load_json
from models.rules import HANDLED_EVENTS
from worker.reconcile.dr_api import (
    DRApiMalformed,
    DROrder,
    dumps_exact,
    parse_event_page,
    retry_after_seconds,
)
from worker.reconcile.plan import (
    LISTED_TYPES,
    RETENTION,
    RETENTION_MARGIN,
    Known,
    Verdict,
    Window,
    drift,
    listed_by,
    next_checkpoint,
    plan_window,
    slices,
    verdict,
)

NOW = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
EARLIEST = NOW - RETENTION + RETENTION_MARGIN


@pytest.mark.parametrize(
    ("checkpoint", "since", "expected"),
    [
        pytest.param(None, None, Window(EARLIEST, NOW), id="first run: all DR keeps"),
        pytest.param(NOW - 2 * HOUR, None, Window(NOW - 3 * HOUR, NOW), id="checkpoint - overlap"),
        pytest.param(
            NOW - RETENTION + 30 * timedelta(minutes=1),
            None,
            Window(EARLIEST, NOW),
            id="overlap reaches past 30 days, checkpoint inside: nothing lost",
        ),
        pytest.param(
            NOW - 40 * timedelta(days=1),
            None,
            Window(EARLIEST, NOW, lost_from=NOW - 40 * timedelta(days=1)),
            id="checkpoint older than 30 days: clamped, gap reported",
        ),
        pytest.param(
            NOW - 2 * HOUR, NOW - 5 * HOUR, Window(NOW - 5 * HOUR, NOW), id="since wins, no overlap"
        ),
        pytest.param(
            None,
            NOW - 31 * timedelta(days=1),
            Window(EARLIEST, NOW, lost_from=NOW - 31 * timedelta(days=1)),
            id="since older than 30 days: clamped, gap reported",
        ),
        pytest.param(None, NOW + HOUR, Window(NOW, NOW), id="since in the future: empty"),
        pytest.param(NOW + HOUR, None, Window(NOW, NOW), id="checkpoint ahead of the clock"),
    ],
)
def test_plan_window(checkpoint: datetime | None, since: datetime | None, expected: Window) -> None:
    window = plan_window(checkpoint=checkpoint, since=since, now=NOW, overlap=HOUR)
    assert window == expected


@pytest.mark.parametrize(
    ("start", "end", "size", "expected"),
    [
        (NOW, NOW, HOUR, []),
        (NOW - HOUR, NOW, 2 * HOUR, [(NOW - HOUR, NOW)]),
        (NOW - 2 * HOUR, NOW, HOUR, [(NOW - 2 * HOUR, NOW - HOUR), (NOW - HOUR, NOW)]),
        (
            NOW - 150 * timedelta(minutes=1),
            NOW,
            HOUR,
            [
                (NOW - 150 * timedelta(minutes=1), NOW - 90 * timedelta(minutes=1)),
                (NOW - 90 * timedelta(minutes=1), NOW - 30 * timedelta(minutes=1)),
                (NOW - 30 * timedelta(minutes=1), NOW),
            ],
        ),
    ],
)
def test_slices_cover_the_window_oldest_first_without_gaps(
    start: datetime, end: datetime, size: timedelta, expected: list[tuple[datetime, datetime]]
) -> None:
    assert slices(start, end, size) == expected


def test_thirty_days_are_thirty_one_day_slices() -> None:
    window = plan_window(checkpoint=None, since=None, now=NOW, overlap=HOUR)
    assert len(slices(window.start, window.end)) == 30


STUCK_AFTER = timedelta(minutes=10)


@pytest.mark.parametrize(
    ("event_type", "known", "expected"),
    [
        ("refund.complete", None, Verdict.MISSING),
        ("sales_transaction.created", None, Verdict.MISSING),
        ("order.accepted", None, Verdict.OTHER_TYPE),
        ("order.accepted", Known(Outcome.QUEUED, NOW - HOUR), Verdict.OTHER_TYPE),
        ("refund.pending", Known(Outcome.APPLIED, NOW), Verdict.DONE),
        ("refund.pending", Known(Outcome.STALE, NOW), Verdict.DONE),
        ("refund.pending", Known(Outcome.IGNORED, NOW), Verdict.DONE),
        ("refund.pending", Known(Outcome.FAILED, NOW), Verdict.DONE),
        ("refund.pending", Known(Outcome.QUEUED, NOW - timedelta(seconds=5)), Verdict.IN_FLIGHT),
        ("refund.pending", Known(Outcome.QUEUED, NOW - STUCK_AFTER), Verdict.STUCK),
        ("refund.pending", Known(Outcome.QUEUED, NOW - HOUR), Verdict.STUCK),
    ],
)
def test_verdict(event_type: str, known: Known | None, expected: Verdict) -> None:
    assert verdict(event_type, known, now=NOW, stuck_after=STUCK_AFTER) is expected


@pytest.mark.parametrize(
    ("current", "listed", "expected"),
    [
        (None, [], None),
        (NOW, [], NOW),
        (None, [NOW - HOUR, NOW, NOW - 2 * HOUR], NOW),
        (NOW, [NOW - HOUR], NOW),
        (NOW - HOUR, [NOW - 2 * HOUR, NOW], NOW),
    ],
)
def test_next_checkpoint_moves_to_the_newest_listed_and_never_back(
    current: datetime | None, listed: list[datetime], expected: datetime | None
) -> None:
    assert next_checkpoint(current, listed) == expected


@pytest.mark.parametrize(
    ("ours", "dr", "expected_dr"),
    [
        (Decimal("27.01"), DROrder("o", "USD", Decimal("27.01")), "same"),
        (Decimal("27.01"), DROrder("o", "USD", Decimal("27.010")), "same"),
        (Decimal("0"), DROrder("o", "USD", None), "same"),
        (Decimal("27.01"), DROrder("o", "USD", Decimal("54.02")), Decimal("54.02")),
        (Decimal("27.01"), DROrder("o", "USD", None), Decimal("0")),
        (Decimal("0"), None, None),
    ],
)
def test_drift(ours: Decimal, dr: DROrder | None, expected_dr: Any) -> None:
    found = drift("o", "USD", ours, dr)
    if expected_dr == "same":
        assert found is None
    else:
        assert found is not None
        assert (found.order_id, found.ours, found.dr) == ("o", ours, expected_dr)


def _event(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "e1",
        "type": "refund.complete",
        "createdTime": "2026-06-30T11:00:00.123456Z",
        "liveMode": False,
        "data": {"object": {"amount": 27.01}},
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "the answer is not a JSON object"),
        ({"data": []}, "hasMore is missing or not a boolean"),
        ({"hasMore": "no", "data": []}, "hasMore is missing or not a boolean"),
        ({"hasMore": False}, "data is missing or not a list"),
        ({"hasMore": False, "data": {"id": "x"}}, "data is missing or not a list"),
        ({"hasMore": True, "data": []}, "hasMore is true on an empty page"),
        ({"hasMore": False, "data": ["e1"]}, "data[0] is not an object"),
        ({"hasMore": False, "data": [_event(id=None)]}, "data[0].id is missing"),
        ({"hasMore": False, "data": [_event(id="")]}, "data[0].id is missing"),
        ({"hasMore": False, "data": [_event(type=7)]}, "data[0].type is missing"),
        # The one envelope check (models.envelope): what the ingest refuses, a page may not hold.
        ({"hasMore": False, "data": [_event(id="e\n1")]}, "data[0].id is missing"),
        ({"hasMore": False, "data": [_event(id="   ")]}, "data[0].id is missing"),
        ({"hasMore": False, "data": [_event(type="refund.\x00")]}, "data[0].type is missing"),
        ({"hasMore": False, "data": [_event(id="e" * 256)]}, "data[0].id is missing"),
        ({"hasMore": False, "data": [_event(createdTime=None)]}, "data[0].createdTime"),
        (
            {"hasMore": False, "data": [_event(), _event(createdTime="2026-06-30T11:00:00")]},
            "data[1].createdTime is missing or not an ISO time",
        ),
        ({"hasMore": False, "data": [_event(createdTime="yesterday")]}, "data[0].createdTime"),
    ],
)
def test_a_malformed_page_is_refused_naming_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(DRApiMalformed, match=r"^GET /events page 2: ") as raised:
        parse_event_page(load_json(json.dumps(body)), "GET /events page 2")
    assert message in str(raised.value)


def test_a_page_keeps_each_event_exactly_as_dr_wrote_its_numbers() -> None:
    text = (
        '{"hasMore": true, "data": [{"id": "e1", "type": "refund.complete",'
        ' "createdTime": "2026-06-30T11:00:00.93644Z", "liveMode": true,'
        ' "data": {"object": {"amount": 53.769999999999996, "refundedAmount": 27.010,'
        ' "tiny": 0.12345678901234567890123, "count": 3, "none": null, "name": "Zoë"}}}]}'
    )
    page = parse_event_page(load_json(text), "GET /events page 1")
    assert page.has_more is True
    [event] = page.events
    assert (event.id, event.type, event.live_mode) == ("e1", "refund.complete", True)
    assert event.created_time == datetime(2026, 6, 30, 11, 0, 0, 936440, tzinfo=UTC)
    obj = load_json(event.body)["data"]["object"]
    assert obj["amount"] == Decimal("53.769999999999996")
    assert obj["refundedAmount"] == Decimal("27.010")
    assert obj["tiny"] == Decimal("0.12345678901234567890123")
    assert (obj["count"], obj["none"], obj["name"]) == (3, None, "Zoë")


@pytest.mark.parametrize(
    "value",
    [{"a": [1, 2.50, -0.0, 1e-7, True, False, None, 'x\u0001"y']}, [], {}, "s", 10**30],
)
def test_dumps_exact_round_trips(value: Any) -> None:
    parsed = load_json(json.dumps(value))
    assert load_json(dumps_exact(parsed)) == parsed


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("2", 2.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-1", None),
        ("inf", None),
        ("soon", None),
        ("Tue, 30 Jun 2026 12:00:30 GMT", 30.0),
        ("Tue, 30 Jun 2026 11:59:00 GMT", 0.0),
    ],
)
def test_retry_after(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header, NOW) == expected


def test_every_handled_type_is_in_exactly_one_listing() -> None:
    for event_type in HANDLED_EVENTS:
        assert sum(listed_by(group, event_type) for group in LISTED_TYPES) == 1, event_type


@pytest.mark.parametrize(
    ("pattern", "event_type", "listed"),
    [
        ("refund.*", "refund.pending_information", True),
        ("refund.*", "order.refunded", False),
        ("order.dispute", "order.dispute.resolved", False),
        ("order.charge.refund.*", "order.charge.capture.complete", False),
    ],
)
def test_a_listing_matches_as_dr_documents_the_wildcard(
    pattern: str, event_type: str, listed: bool
) -> None:
    assert listed_by(pattern, event_type) is listed

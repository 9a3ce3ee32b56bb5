"""The unit of work: one event, one transaction that applies it.

A copy of an event is first counted in its own short transaction (so attempts survive a
worker killed mid-task), then applied in one transaction that locks the event row (so
concurrent copies wait and then see the outcome) and the order row (so events for one
order apply one at a time), runs the pure rules and records the outcome.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc

from models import feed, ledger, orders, store, trust
from models.db import autocommit, is_sqlite, make_engine, transaction
from models.envelope import EventHeader, header_of, usable_text
from models.errors import ConfigError, InvalidEvent, PermanentError, TransientError
from models.logs import bound, brief
from models.outcome import FINAL_OUTCOMES, Outcome
from models.payloads import Envelope, as_utc, load_json
from models.rules import (
    Change,
    Decision,
    EventRef,
    Ignore,
    OrderState,
    Plan,
    apply,
    ignored_type,
    interpret,
)
from models.settings import Settings, load_settings
from worker import metrics
from worker.errors import classify
from worker.queue.keys import QueueKeys

log = logging.getLogger("refundsync.worker")

T = TypeVar("T")

_engine: Engine | None = None
_keys: QueueKeys | None = None


def reset_engine() -> None:
    """Forget the engine and the queue keys read through it (after a fork); the next use
    opens a fresh pool."""
    global _engine, _keys
    _engine = None
    _keys = None


def engine(settings: Settings) -> Engine:
    """This process's engine, created on first use."""
    global _engine
    if _engine is None:
        if not settings.database_url:
            load_settings("DATABASE_URL")
        # Every step is retried on a connection error, so no ping before each checkout.
        _engine = make_engine(settings.database_url or "", pool_size=2, pre_ping=False)
    return _engine


@dataclass(frozen=True)
class Result:
    """What happened to one copy of an event."""

    event_id: str | None
    outcome: Outcome | None
    duplicate: bool = False
    reason: str | None = None
    changes: tuple[Change, ...] = ()
    event_type: str | None = None
    order_id: str | None = None
    # The order's version after this event, when it changed the summary.
    version: int | None = None
    # Not sealed by refundsync: never applied, and recorded apart from the events.
    refused: bool = False

    @property
    def task_result(self) -> str:
        """What the events.apply task returns for it (Flower shows it)."""
        if self.refused:
            return "refused"
        return self.outcome.value if self.outcome else metrics.UNRECORDABLE


def _db(call: Callable[[], T]) -> T:
    """Run a database step, turning driver failures into the typed error tree."""
    try:
        return call()
    except sa_exc.DBAPIError as exc:
        raise classify(exc) from exc


@dataclass(frozen=True)
class Copy:
    """One copy of an event as it reached a worker."""

    body: str
    received_at: datetime
    source: str
    # The queue message's id. It stays the same when the message is retried or comes back
    # from a worker that died holding it, so a copy from DR counts once in `deliveries`.
    message: str
    # The message came back unacknowledged: an earlier attempt may have died with its worker.
    redelivered: bool = False
    # The message's seal, and `received_at` as the message wrote it (what the seal covers).
    seal: object = None
    received_text: str = ""


def copy_of(
    delivery_info: dict[str, Any] | None,
    message: str | None,
    body: str,
    received_at: str,
    source: str = "webhook",
    seal: object = None,
    counted: object = None,
) -> Copy:
    """The copy an events.apply message carries: its delivery info, its id and the task's
    arguments. `counted` is ignored (retries of earlier versions carry it)."""
    del counted
    return Copy(
        body,
        _parse_time(received_at),
        source,
        # Without an id (a message made by hand) each arrival is a copy of its own.
        message=message if isinstance(message, str) and message else uuid.uuid4().hex,
        redelivered=bool((delivery_info or {}).get("redelivered")),
        seal=seal,
        received_text=received_at,
    )


def queue_keys(settings: Settings) -> QueueKeys:
    """This process's queue keys, read from the database on first use."""
    global _keys
    if _keys is None:

        def load() -> list[bytes]:
            with engine(settings).connect() as conn:
                return trust.load_keys(conn)

        _keys = QueueKeys(load)
    return _keys


def trusted(settings: Settings, copy: Copy) -> bool:
    """Whether the copy's message was sealed by refundsync (ingest, reconciliation, replay,
    sweeper). Raises TransientError if the keys cannot be read."""
    arguments = (copy.body, copy.received_text, copy.source)
    if not all(isinstance(argument, str) for argument in arguments):
        return False
    keys = queue_keys(settings)
    try:
        return _db(lambda: keys.verifies(copy.seal, *arguments))
    except ConfigError as exc:
        # Not migrated yet: nothing is refused or applied until it is.
        raise TransientError(str(exc)) from exc


def refuse(settings: Settings, copy: Copy) -> Result:
    """Record a message that is not sealed by refundsync, and apply nothing of it.

    Kept apart from the events: recorded under its event id, a forged copy would stand in
    for the real event, which DR's own copy would then find already finished."""
    claimed_id = claimed_type = None
    try:
        data = load_json(copy.body) if isinstance(copy.body, str) else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        claimed_id, claimed_type = usable_text(data.get("id")), usable_text(data.get("type"))
    reason = "not sealed by refundsync" if copy.seal is None else "its seal does not verify"
    source = copy.source if isinstance(copy.source, str) else repr(copy.source)

    def record() -> None:
        with transaction(engine(settings)) as conn:
            trust.record_refusal(
                conn, event_id=claimed_id, event_type=claimed_type, source=source, reason=reason
            )

    _db(record)
    log.warning(
        "message.refused",
        extra={"event_id": claimed_id, "event_type": claimed_type, "reason": reason},
    )
    metrics.REFUSED.inc()
    return Result(None, None, reason=reason, refused=True)


def _parse_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)


def process(settings: Settings, copy: Copy) -> Result:
    """Apply one copy of an event. Raises TransientError when it should be tried again."""
    if not trusted(settings, copy):
        return refuse(settings, copy)
    try:
        data = load_json(copy.body)
        header = header_of(data)
    except (ValueError, RecursionError, InvalidEvent) as exc:
        # Without an id there is nothing to record the failure against; the ingest
        # refuses such bodies, so only a hand-made message gets here.
        log.warning("event.unrecordable", extra={"reason": brief(str(exc))})
        return Result(None, None, reason=brief(str(exc)))
    with bound(event_id=header.id, event_type=header.type):
        result = _process_copy(settings, header, data, copy)
    _observe(header, copy, result)
    return result


def _observe(header: EventHeader, copy: Copy, result: Result) -> None:
    metrics.observe(
        header.type,
        result.outcome,
        duplicate=result.duplicate,
        received_at=copy.received_at,
        created_time=header.created_time,
    )


def event_id_of(body: str) -> str | None:
    """The event's id, if the body has a usable one."""
    try:
        return header_of(load_json(body)).id
    except (ValueError, RecursionError, InvalidEvent):
        return None


def _process_copy(settings: Settings, header: EventHeader, data: Any, copy: Copy) -> Result:
    db = engine(settings)
    retry_error: TransientError | None = None
    if not copy.redelivered:
        # The common case: record the copy and apply it in one transaction.
        try:
            return _record_and_apply(db, settings, header, data, copy)
        except TransientError as exc:
            retry_error = exc
        except PermanentError:
            pass  # met again below, and recorded as the event's failure
        except Exception as exc:
            # Unforeseen: nothing of the attempt committed, so record the copy below and
            # retry it like a transient error, its error kept on the event for operators.
            log.exception("event.unexpected_error")
            retry_error = TransientError(
                f"unexpected error: {type(exc).__name__}: {exc}"[: ledger.ERROR_CHARS]
            )
    # An earlier attempt died with its worker, or this one failed: nothing of it committed.
    # The copy is recorded in a transaction of its own first, so its attempt counts however
    # the rest ends (a poison event is seen as such).
    delivery = _record(db, header, copy)
    try:
        if retry_error is not None:
            raise retry_error
        return _process(settings, db, header, data, delivery)
    except TransientError as exc:
        note_error(settings, header.id, str(exc), copy.message)
        raise


def _verdict(settings: Settings, header: EventHeader, delivery: ledger.Delivery) -> Result | None:
    """What a recorded copy comes to without applying it; None when it is to be applied."""
    if delivery.outcome in FINAL_OUTCOMES:
        return Result(header.id, delivery.outcome, duplicate=True)
    if delivery.type != header.type:
        log.warning(
            "event.id_conflict",
            extra={"event_id": header.id, "stored_type": delivery.type, "type": header.type},
        )
        return Result(header.id, delivery.outcome, duplicate=True, reason="id reused")
    # Only attempts that died with their worker count here: a poison event. Transient
    # errors are retried with their own limit, and concurrent copies never count.
    if delivery.lost_attempts >= settings.max_attempts:
        last = f"; last error: {delivery.error}" if delivery.error else ""
        reason = f"gave up after {delivery.lost_attempts} attempts died with their worker{last}"
        return Result(header.id, Outcome.FAILED, reason=reason)
    return None


def _record_and_apply(
    db: Engine, settings: Settings, header: EventHeader, data: Any, copy: Copy
) -> Result:
    # Validated first (pure, no lock held yet): an invalid event takes the two-step path,
    # which records it and its reason.
    interpreted = _interpret(settings, data)
    plan = interpreted[1]
    order_id = plan.order_id if isinstance(plan, Plan) else None

    def run() -> Result:
        with transaction(db) as conn:
            delivery, state = store.record_and_load(
                conn,
                header,
                copy.body,
                received_at=copy.received_at,
                source=copy.source,
                message=copy.message,
                order_id=order_id,
            )
            # Recording locked the event row: a concurrent copy waits there until this
            # transaction ends, then finds the outcome.
            verdict = _verdict(settings, header, delivery)
            return _decide_and_save(conn, settings, header.id, verdict, interpreted, state)

    result = _db(run)
    _log_applied(result)
    return result


@dataclass(frozen=True)
class _Ready:
    """A copy parsed and interpreted, ready to be applied together with others."""

    index: int
    copy: Copy
    header: EventHeader
    interpreted: tuple[Envelope, Plan | Ignore]
    labels: dict[str, str]


def process_together(
    settings: Settings, copies: Sequence[tuple[Copy, dict[str, str]] | None]
) -> list[Result | None]:
    """Apply several copies in one transaction, each as `process` would; None for a copy
    left to `process` alone (and for a None in `copies`).

    Only first attempts at valid events take part, one copy per event id. The transaction
    commits every one of them or none: whatever goes wrong, nothing is kept and all are
    left to `process`, whose own transaction, retries and failure handling then apply to
    each. `labels` are the copy's log fields (its task id).
    """
    ready: list[_Ready] = []
    seen: set[str] = set()
    db = engine(settings)
    if is_sqlite(db):
        # One writer at a time there anyway: nothing to gain.
        return [None] * len(copies)
    for index, item in enumerate(copies):
        if item is None:
            continue
        copy, labels = item
        if copy.redelivered:
            continue  # its attempt must count on its own first (_process_copy)
        try:
            if not trusted(settings, copy):
                continue  # refused, and recorded as such, by `process`
        except TransientError:
            return [None] * len(copies)
        try:
            data = load_json(copy.body)
            header = header_of(data)
            interpreted = _interpret(settings, data)
        except (ValueError, RecursionError, InvalidEvent):
            continue  # recorded, or refused, with its reason by `process`
        if header.id in seen:
            continue  # a second copy in the same transaction would be applied twice
        seen.add(header.id)
        ready.append(_Ready(index, copy, header, interpreted, labels))
    results: list[Result | None] = [None] * len(copies)
    if len(ready) < 2:
        return results
    try:
        applied = _db(lambda: _apply_together(db, settings, ready))
    except Exception as exc:  # noqa: BLE001 - every copy is then processed on its own
        # Only the kind of error: each copy's own attempt logs (and keeps) the details.
        log.info(
            "events.apply_together_failed",
            extra={"events": len(ready), "error": type(exc).__name__},
        )
        return results
    for done, result in zip(ready, applied, strict=True):
        with bound(**done.labels, event_id=done.header.id, event_type=done.header.type):
            _log_applied(result)
        _observe(done.header, done.copy, result)
        results[done.index] = result
    return results


def _apply_together(db: Engine, settings: Settings, ready: list[_Ready]) -> list[Result]:
    # Event rows are locked in the order of their ids, then orders in the order of theirs
    # (orders.lock_orders), as a single copy locks its event row before its order: two
    # transactions never wait on each other in a cycle.
    by_id = sorted(ready, key=lambda item: item.header.id)
    with transaction(db) as conn:
        recorded = ledger.record_copies(
            conn,
            [
                (
                    item.header,
                    (item.copy.body, item.copy.received_at, item.copy.source, item.copy.message),
                )
                for item in by_id
            ],
        )
        deliveries = {item.header.id: found for item, found in zip(by_id, recorded, strict=True)}
        verdicts = [_verdict(settings, item.header, deliveries[item.header.id]) for item in ready]
        kinds = {
            plan.order_id: plan.kind
            for item, verdict in zip(ready, verdicts, strict=True)
            if verdict is None and isinstance(plan := item.interpreted[1], Plan)
        }
        before = orders.lock_orders(conn, kinds) if kinds else {}
        states = dict(before)
        decided = [
            # Events for one order apply one after the other, each to its predecessor's
            # state, as they would in transactions of their own.
            _decide(item.header.id, verdict, item.interpreted, states)
            for item, verdict in zip(ready, verdicts, strict=True)
        ]
        _save(conn, settings, before, states, decided)
    return [done.result for done in decided]


def _process(
    settings: Settings,
    db: Engine,
    header: EventHeader,
    data: Any,
    delivery: ledger.Delivery,
) -> Result:
    verdict = _verdict(settings, header, delivery)
    if verdict is not None and verdict.duplicate:
        return verdict
    try:
        return _db(lambda: _apply(db, settings, header.id, data, verdict))
    except PermanentError as exc:
        return fail(settings, header.id, str(exc))


def preview(settings: Settings, event: ledger.StoredEvent) -> Result:
    """What applying a stored event now would do, in a transaction that is rolled back."""
    data = load_json(event.payload)
    db = engine(settings)
    with db.connect() as conn, conn.begin() as scope:
        try:
            ledger.requeue(conn, event.id)
            return _db(lambda: _apply_in(conn, settings, event.id, data))
        except PermanentError as exc:
            return Result(event.id, Outcome.FAILED, reason=str(exc))
        finally:
            scope.rollback()


def _record(db: Engine, header: EventHeader, copy: Copy) -> ledger.Delivery:
    def record(raw: str) -> ledger.Delivery:
        # One statement, committed on its own.
        with autocommit(db) as conn:
            return ledger.record_delivery(
                conn,
                header,
                raw,
                received_at=copy.received_at,
                source=copy.source,
                message=copy.message,
                redelivered=copy.redelivered,
            )

    try:
        return _db(lambda: record(copy.body))
    except PermanentError as exc:
        # Postgres refused the payload itself (e.g. a \u0000 in a string): keep the
        # record with a stand-in payload so the failure is visible and final.
        stand_in = json.dumps(
            {"unstorable": True, "id": header.id, "type": header.type, "error": brief(str(exc))}
        )
        try:
            delivery = _db(lambda: record(stand_in))
        except PermanentError as again:
            # Not even the stand-in: the database itself refuses writes (read-only, schema
            # missing). Never acknowledge such a copy; try again later.
            raise TransientError(str(again)) from again
        if delivery.outcome not in FINAL_OUTCOMES:
            _mark_failed(db, header.id, str(exc))
        return replace(delivery, outcome=Outcome.FAILED)


def _apply(
    db: Engine, settings: Settings, event_id: str, data: Any, verdict: Result | None
) -> Result:
    with transaction(db) as conn:
        result = _apply_in(conn, settings, event_id, data, verdict)
    _log_applied(result)
    return result


def _log_applied(result: Result) -> None:
    # Logged once committed: a log line never claims what a rollback undid.
    if result.duplicate or result.outcome is None or result.event_id is None:
        return
    if result.outcome is Outcome.FAILED:
        log.warning(
            "event.failed",
            extra={"event_id": result.event_id, "reason": brief(result.reason)},
        )
        return
    # One line per event, its changes included: a line per change cost more than the rest
    # of the logging of an event.
    changes = [
        {"entity": c.entity, "id": c.entity_id, "from": c.from_state, "to": c.to_state}
        for c in result.changes
    ]
    extra: dict[str, Any] = {
        "event_id": result.event_id,
        "type": result.event_type or "",
        **({"order_id": result.order_id} if result.order_id else {}),
        **({"reason": result.reason} if result.reason else {}),
        **({"changes": changes} if changes else {}),
    }
    log.info(f"event.{result.outcome.value}", extra=extra)


def _apply_in(
    conn: Connection, settings: Settings, event_id: str, data: Any, verdict: Result | None = None
) -> Result:
    """Lock the event row and apply the event, or record `verdict` instead of applying it,
    unless the event finished meanwhile."""
    outcome = ledger.lock_event(conn, event_id)
    if outcome in FINAL_OUTCOMES:
        return Result(event_id, outcome, duplicate=True)
    interpreted = None if verdict is not None else _interpret(settings, data)
    return _decide_and_save(conn, settings, event_id, verdict, interpreted)


def _interpret(settings: Settings, data: Any) -> tuple[Envelope, Plan | Ignore]:
    """The event validated, and what it means (pure): raises InvalidEvent."""
    # An unhandled type is ignored whatever else the event holds: its envelope is DR's
    # business, and a failure would page an operator for an event nobody needs.
    event_type = data.get("type") if isinstance(data, dict) else None
    unhandled = ignored_type(event_type) if isinstance(event_type, str) else None
    if unhandled is not None:
        # Nothing else of it is read: an Ignore needs only the envelope's id and type.
        known: dict[str, Any] = {"id": data.get("id"), "type": event_type}
        return Envelope.model_construct(**known), unhandled
    try:
        envelope = Envelope.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidEvent(f"{where}: {error['msg']}") from None
    return envelope, interpret(envelope, settings.dr_live_mode)


@dataclass(frozen=True)
class _Decided:
    """What one copy comes to, and what of it is to be written."""

    result: Result
    # The event's outcome to record; None when there is nothing to record (a duplicate).
    finish: ledger.Finish | None = None
    history: tuple[dict[str, Any], ...] = ()
    # The order's state after the event, when the event changed it.
    changed: OrderState | None = None


def _decide(
    event_id: str,
    verdict: Result | None,
    interpreted: tuple[Envelope, Plan | Ignore] | None,
    states: dict[str, OrderState],
) -> _Decided:
    """The one decision, alone, together or in a preview: a verdict found when recording
    the copy, an ignored event, or the rules applied to its order's state (locked and
    loaded in `states`, which it updates)."""
    if verdict is not None:
        if verdict.outcome is Outcome.FAILED and not verdict.duplicate:
            failed = ledger.Finish(event_id, Outcome.FAILED, error=verdict.reason or "")
            return _Decided(verdict, failed)
        return _Decided(verdict)
    assert interpreted is not None  # noqa: S101 - a copy to apply was interpreted first
    envelope, plan = interpreted
    if isinstance(plan, Ignore):
        ignored = Result(event_id, Outcome.IGNORED, reason=plan.reason, event_type=envelope.type)
        return _Decided(ignored, ledger.Finish(event_id, Outcome.IGNORED, error=plan.reason))
    ref = EventRef(as_utc(envelope.createdTime), envelope.id)
    decision = apply(states[plan.order_id], ref, plan)
    states[plan.order_id] = decision.state
    changes = decision.changes
    return _Decided(
        _decided(envelope, plan, decision),
        ledger.Finish(event_id, decision.outcome, order_id=plan.order_id),
        tuple(orders.history_rows(plan.order_id, event_id, changes)),
        decision.state if changes else None,
    )


def _save(
    conn: Connection,
    settings: Settings,
    before: dict[str, OrderState],
    after: dict[str, OrderState],
    decided: Sequence[_Decided],
) -> None:
    """The one commit step: every write of the decided copies, sent together, with one
    change of the feed for each copy that changed its order."""
    deliver = settings.notify_url is not None
    feed_rows = [
        feed.change_row(done.changed, done.result.event_id, deliver=deliver)
        for done in decided
        if done.changed is not None
    ]
    changed = sorted({done.changed.order_id for done in decided if done.changed is not None})
    store.save_all(
        conn,
        [(before[order_id], after[order_id]) for order_id in changed],
        [row for done in decided for row in done.history],
        [done.finish for done in decided if done.finish is not None],
        feed_rows,
    )


def _decide_and_save(
    conn: Connection,
    settings: Settings,
    event_id: str,
    verdict: Result | None,
    interpreted: tuple[Envelope, Plan | Ignore] | None,
    state: OrderState | None = None,
) -> Result:
    """Decide one copy whose event row this transaction holds locked, and write it; its
    order is locked and loaded here unless `state` already is."""
    states: dict[str, OrderState] = {}
    plan = interpreted[1] if interpreted is not None else None
    if verdict is None and isinstance(plan, Plan):
        states[plan.order_id] = (
            state if state is not None else orders.lock_order(conn, plan.order_id, plan.kind)
        )
    before = dict(states)
    decided = _decide(event_id, verdict, interpreted, states)
    _save(conn, settings, before, states, [decided])
    return decided.result


def _decided(envelope: Envelope, plan: Plan, decision: Decision) -> Result:
    return Result(
        envelope.id,
        decision.outcome,
        changes=decision.changes,
        event_type=envelope.type,
        order_id=plan.order_id,
        version=decision.state.version if decision.changes else None,
    )


def fail(settings: Settings, event_id: str, reason: str) -> Result:
    """Record a final `failed` outcome with its reason (unless the event already finished)."""
    return _mark_failed(engine(settings), event_id, reason)


def _mark_failed(db: Engine, event_id: str, reason: str) -> Result:
    def record_failure() -> Outcome | None:
        with transaction(db) as conn:
            outcome = ledger.lock_event(conn, event_id)
            if outcome is None:
                # Never recorded (every attempt failed before its copy was): acknowledging
                # now would lose the event without a trace, so it stays to be tried again.
                raise TransientError("the event is not recorded yet")
            if outcome in FINAL_OUTCOMES:
                return outcome
            ledger.finish_event(conn, event_id, Outcome.FAILED, error=reason)
            return Outcome.FAILED

    outcome = _db(record_failure)
    if outcome is Outcome.FAILED:
        log.warning("event.failed", extra={"event_id": event_id, "reason": brief(reason)})
        return Result(event_id, Outcome.FAILED, reason=reason)
    return Result(event_id, outcome, duplicate=True)


def note_error(settings: Settings, event_id: str, error: str, message: str) -> None:
    """Best effort: keep the last transient error on the event for operators, and end the
    attempt of `message` (if the note is lost, a retry is no redelivery: nothing is lost)."""
    try:
        with transaction(engine(settings)) as conn:
            ledger.note_error(conn, event_id, error, message)
    except sa_exc.SQLAlchemyError:
        log.debug("event.note_error_skipped", extra={"event_id": event_id})

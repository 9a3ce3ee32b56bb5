"""Recompute stored orders from their events: after an upgrade whose rules keep more of
each event (contract v2 of the summary), every order is brought to what the rules now give.

An order's state is a function of the set of distinct events applied to it (the convergence
rule), so its applied and stale events, applied again in any order to an empty state, give
it. Each batch of orders is locked while it is recomputed, so workers applying events
meanwhile wait for it, and then apply to the rebuilt state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from models import feed, ledger, orders, store
from models.db import transaction
from models.errors import InvalidEvent, TransientError
from models.payloads import Envelope, as_utc, load_json
from models.rules import EventRef, Ignore, OrderState, apply, interpret
from models.settings import LiveMode

log = logging.getLogger("refundsync.rebuild")


@dataclass(frozen=True)
class Rebuilt:
    """What a rebuild did."""

    orders: int
    events: int
    changed: int
    seconds: float


def rebuilt(state: OrderState, payloads: list[str], live_mode: LiveMode) -> OrderState:
    """The order's state from its events alone. Its version is one more than the stored one
    if the rebuild changed the summary, or if the order was never versioned (stored before
    versions existed): the rebuild is one committed change."""
    fresh = OrderState(state.order_id, kind=state.kind)
    parsed = []
    for payload in payloads:
        try:
            envelope = Envelope.model_validate(load_json(payload))
            plan = interpret(envelope, live_mode)
        except (ValueError, InvalidEvent) as exc:
            # Applied once, refused by today's rules: the rest still counts.
            log.warning("rebuild.event_refused", extra={"error": str(exc)[:300]})
            continue
        if not isinstance(plan, Ignore):
            parsed.append((EventRef(as_utc(envelope.createdTime), envelope.id), plan))
    for ref, plan in sorted(parsed, key=lambda item: item[0]):
        try:
            fresh = apply(fresh, ref, plan).state
        except InvalidEvent as exc:
            log.warning(
                "rebuild.event_refused", extra={"event_id": ref.id, "error": str(exc)[:300]}
            )
    changed = replace(fresh, version=0) != replace(state, version=0) or state.version == 0
    return replace(fresh, version=state.version + 1 if changed else state.version)


# Orders per transaction: each batch's orders stay locked while it is recomputed (about
# 0.2 s per 100 orders of 10 events, benchmark 5), well inside a worker's lock timeout.
BATCH = 100
# A batch that cannot take its locks in time (workers hold them) is tried again, this often.
_RETRYING = Retrying(
    stop=stop_after_attempt(5),
    wait=wait_fixed(0.5),
    retry=retry_if_exception_type(TransientError),
    before_sleep=lambda state: log.info(
        "rebuild.batch_retried", extra={"attempt": state.attempt_number}
    ),
    reraise=True,
)


def rebuild_all(
    engine: Engine,
    live_mode: LiveMode,
    batch: int = BATCH,
    *,
    deliver: bool = False,
) -> Rebuilt:
    """Rebuild every order, `batch` orders per transaction, in the order of their ids; each
    changed order gets a change in the feed (to be delivered when `deliver`)."""
    started = time.monotonic()
    after, total, events, changed = "", 0, 0, 0
    while True:
        found, applied, differ = _RETRYING(
            _rebuild_in_transaction, engine, after, batch, live_mode, deliver
        )
        if not found:
            break
        after = found
        total += applied[0]
        events += applied[1]
        changed += differ
    return Rebuilt(total, events, changed, time.monotonic() - started)


def _rebuild_in_transaction(
    engine: Engine, after: str, batch: int, live_mode: LiveMode, deliver: bool
) -> tuple[str | None, tuple[int, int], int]:
    try:
        with transaction(engine) as conn:
            return _rebuild_batch(conn, after, batch, live_mode, deliver)
    except OperationalError as exc:
        # A lock wait past the timeout, a deadlock, a lost connection: the batch is redone.
        raise TransientError(str(exc).splitlines()[0][:300]) from exc


def _rebuild_batch(
    conn: Connection, after: str, batch: int, live_mode: LiveMode, deliver: bool
) -> tuple[str | None, tuple[int, int], int]:
    states = orders.lock_existing(conn, after, batch)
    if not states:
        return None, (0, 0), 0
    payloads: dict[str, list[str]] = {state.order_id: [] for state in states}
    for order_id, payload in ledger.applied_events_of(conn, list(payloads)):
        payloads[order_id].append(payload)
    changes = []
    for state in states:
        fresh = rebuilt(state, payloads[state.order_id], live_mode)
        if fresh != state:
            changes.append((state, fresh))
    feed_rows = [feed.change_row(fresh, None, deliver=deliver) for _, fresh in changes]
    store.save_all(conn, changes, [], [], feed_rows)
    count = sum(len(found) for found in payloads.values())
    return states[-1].order_id, (len(states), count), len(changes)

"""The `refundsync` command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from models import feed, ledger, logs, outbox, rebuild, trust, views
from models.db import describe, make_engine, transaction
from models.errors import ConfigError, RefundSyncError
from models.payloads import iso
from models.settings import Settings, load_settings
from models.signature import sign as make_signature
from models.telemetry import share_metrics_between_processes
from worker.queue.connect import refuse_untrusted_redis

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def _fail(message: str) -> NoReturn:
    click.echo(f"refundsync: {message}", err=True)
    sys.exit(1)


def _settings(*required: str) -> Settings:
    try:
        return load_settings(*required)
    except ConfigError as exc:
        _fail(str(exc))


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def _print_line(value: Any) -> None:
    """One JSON document per line, for lists a script reads line by line."""
    click.echo(json.dumps(value, separators=(",", ":")))


@click.group(help="Keep order refund data in sync with Digital River webhooks.")
def main() -> None:
    logs.configure()


@main.command(help="Apply the database migrations (Alembic upgrade head).")
def migrate() -> None:
    # Here, not at the top: Alembic is only for this command and `run`, and every worker
    # process would carry it.
    from models.migrate import upgrade

    settings = _settings("DATABASE_URL")
    try:
        upgrade(settings.database_url or "")
    except SQLAlchemyError as exc:
        _fail(f"migration failed: {describe(exc)}")
    click.echo("refundsync: database schema is up to date")


def _exit_normally(signum: int, _: FrameType | None) -> NoReturn:
    sys.exit(0)


@main.command(help="Serve the webhook endpoint and read API.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--max-header-bytes",
    default=16 * 1024,
    show_default=True,
    type=click.IntRange(1024, 1024 * 1024),
    help="Largest request line and headers; larger ones get 431 and the connection closes.",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds a request's line and headers may take to arrive (from the connection's "
    "start or the request's first byte); then 408 and the connection closes.",
)
@click.option(
    "--body-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds a request's body may take to arrive after its headers; then 408 and the "
    "connection closes.",
)
@click.option(
    "--keep-alive-timeout",
    default=5,
    show_default=True,
    type=click.IntRange(1, 3600),
    help="Seconds an idle connection is kept open between requests.",
)
@click.option(
    "--limit-concurrency",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Open connections or running requests per worker process beyond which requests "
    "get 503 with Retry-After.",
)
def ingest(
    host: str,
    port: int,
    workers: int,
    max_header_bytes: int,
    header_timeout: float,
    body_timeout: float,
    keep_alive_timeout: int,
    limit_concurrency: int,
) -> None:
    # Here, not at the top: uvicorn is only for this command, and every worker process
    # would carry it.
    from ingest.server import Limits, serve

    refuse_untrusted_redis(_settings("REDIS_URL", "DATABASE_URL", "DR_WEBHOOK_SECRETS"))
    share_metrics_between_processes()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again
    # under the handlers it found: these make that a normal exit, so exit handlers (the
    # metrics directory's removal) still run.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_normally)
    limits = Limits(
        max_header_bytes=max_header_bytes,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        keep_alive_timeout_s=keep_alive_timeout,
        limit_concurrency=limit_concurrency,
    )
    serve("ingest.app:app", host=host, port=port, workers=workers, limits=limits)


@main.command(
    context_settings=PASS_THROUGH,
    help="Run a Celery worker; other options (e.g. --concurrency N) go to Celery.",
)
@click.pass_context
def worker(ctx: click.Context) -> None:
    refuse_untrusted_redis(_settings("REDIS_URL", "DATABASE_URL"))
    _celery("worker", ctx.args)


@main.command(context_settings=PASS_THROUGH, help="Run Celery beat (periodic tasks).")
@click.pass_context
def beat(ctx: click.Context) -> None:
    refuse_untrusted_redis(_settings("REDIS_URL", "DATABASE_URL"))
    _celery("beat", ctx.args)


def _celery(command: str, args: list[str]) -> None:
    """Run a `celery` command on refundsync's app; exits with its status.

    Not `app.worker_main`/`app.start`: they return instead of exiting, and drop the
    status of a worker stopped by an unrecoverable error, which then exits 0 and a
    supervisor that restarts failed processes leaves it down.
    """
    from celery.bin.celery import celery

    # Made here first: Celery would report a failure to make the app (REDIS_URL unset) as
    # a usage error (status 2).
    from worker.app import app  # noqa: F401

    argv = ["--app", "worker.app:app", command, "--loglevel", "INFO", *args]
    celery.main(argv, prog_name="refundsync", standalone_mode=True)


@main.command(
    help="Migrate, then run ingest, a worker and beat together; Ctrl-C stops all. With "
    "neither DATABASE_URL nor REDIS_URL set, runs standalone on SQLite files in --data-dir."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the standalone mode keeps its files (default: the user data directory).",
)
@click.option(
    "--dev-secret",
    is_flag=True,
    help="Without DR_WEBHOOK_SECRETS, sign with a development secret (printed; kept in the "
    "data directory).",
)
def run(host: str, port: int, data_dir: Path | None, dev_secret: bool) -> None:
    from worker import standalone

    settings = _settings()
    try:
        plan = standalone.plan_run(settings, data_dir, dev_secret=dev_secret)
    except ConfigError as exc:
        _fail(str(exc))
    env = {**os.environ, **plan.env}
    # The URLs may come from a .env file rather than the environment.
    database_url = plan.env.get("DATABASE_URL") or settings.database_url or ""
    from models.migrate import upgrade

    try:
        upgrade(database_url)
    except SQLAlchemyError as exc:
        _fail(f"migration failed: {describe(exc)}")
    if plan.standalone:
        try:
            restored = standalone.prepare(plan.env["REDIS_URL"], settings.queue)
        except SQLAlchemyError as exc:
            _fail(f"the standalone queue cannot be opened: {describe(exc)}")
        if restored:
            click.echo(f"refundsync: {restored} message(s) a stopped worker held are queued again")
    me = [sys.executable, "-m", "worker.cli"]
    worker_options = (
        # SQLite takes one writer at a time: one worker process, and no monitors.
        ["--concurrency", "1", "--without-mingle", "--without-gossip", "--without-heartbeat"]
        if plan.standalone
        else ["--concurrency", "2"]
    )
    commands = [
        [*me, "ingest", "--host", host, "--port", str(port)],
        [*me, "worker", *worker_options, "--hostname", "refundsync@%h"],
        [*me, "beat", "--schedule", str(plan.data_dir / "celerybeat-schedule")],
    ]
    # Each child in a process group of its own: Ctrl-C reaches only this process, which
    # stops every child with exactly one SIGTERM (a second signal would turn Celery's warm
    # shutdown into a cold one, and interrupt exit handlers).
    children: list[subprocess.Popen[bytes]] = []
    signalled: set[int] = set()
    stopping: list[int] = []

    def terminate_all() -> None:
        for child in children:
            if child.pid not in signalled and child.poll() is None:
                signalled.add(child.pid)
                child.send_signal(signal.SIGTERM)

    def stop(signum: int, _: FrameType | None) -> None:
        stopping.append(signum)
        terminate_all()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    for command in commands:
        if not stopping:
            children.append(subprocess.Popen(command, env=env, process_group=0))  # noqa: S603
    if not stopping:
        # Printed once the ingest answers, so the lines are not lost among start-up logs.
        standalone.wait_until_serving(host, port, children[0])
    if not stopping:
        for line in standalone.banner(plan, host, port):
            click.echo(f"refundsync: {line}")
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.5)
    # Stopped by a signal, or one child ended: stop the others (a child started just as the
    # signal came is stopped here too).
    terminate_all()
    failed = False
    for name, child in zip(("ingest", "worker", "beat"), children, strict=False):
        code = child.wait()
        # A child stopped by the signal it was sent stopped as asked; one that ended on its
        # own, even with status 0, left the service incomplete (unless a stop was asked
        # for: a supervisor may signal every process of the group at once).
        if code not in (0, -signal.SIGTERM) or (child.pid not in signalled and not stopping):
            click.echo(f"refundsync: {name} exited with status {code}", err=True)
            failed = True
    sys.exit(1 if failed else 0)


@main.group(help="Look at one order.")
def order() -> None:
    pass


@order.command("show", help="Print an order's refund summary as JSON.")
@click.argument("order_id")
def order_show(order_id: str) -> None:
    _show(views.order_summary, order_id, "order")


def _show(view: Any, key: str, kind: str) -> None:
    summary = _read(view, key)
    if summary is None:
        _fail(f"{kind} {key} not found")
    _print_json(summary)


@order.command(
    "rebuild",
    help="Recompute every order's summary from its applied events (after an upgrade that "
    "keeps more of them, e.g. contract v2); safe to run while workers apply events.",
)
@click.option(
    "--batch",
    default=rebuild.BATCH,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Orders recomputed per transaction (locked meanwhile).",
)
def order_rebuild(batch: int) -> None:
    from worker import processing

    settings = _settings("DATABASE_URL")
    try:
        done = rebuild.rebuild_all(
            processing.engine(settings),
            settings.dr_live_mode,
            batch,
            deliver=settings.notify_url is not None,
        )
    except (SQLAlchemyError, RefundSyncError) as exc:
        reason = describe(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        _fail(f"rebuild stopped: {reason}; the batches done are kept, run it again")
    click.echo(
        f"rebuild: orders={done.orders} events={done.events} changed={done.changed}"
        f" seconds={done.seconds:.1f}"
    )


@main.group(help="Look at one invoice's refunds (refunds that name an invoice, no order).")
def invoice() -> None:
    pass


@invoice.command("show", help="Print an invoice's refund summary as JSON.")
@click.argument("invoice_id")
def invoice_show(invoice_id: str) -> None:
    _show(views.invoice_summary, invoice_id, "invoice")


@main.group(help="Look at processed events.")
def events() -> None:
    pass


@events.command("show", help="Print an event's processing record as JSON.")
@click.argument("event_id")
def events_show(event_id: str) -> None:
    record = _read(views.event_record, event_id)
    if record is None:
        _fail(f"event {event_id} not found")
    _print_json(record)


@events.command("failed", help="List failed (dead-lettered) events, newest first.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
def events_failed(limit: int) -> None:
    _print_json(_read(views.event_records, outcome="failed", limit=limit))


@events.command(
    "refused",
    help="List queue messages refused as not sealed by refundsync (never applied), newest first.",
)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
def events_refused(limit: int) -> None:
    _print_json(_read(trust.refusals, limit))


@events.command(
    "replay",
    help="Publish stored events again: the given ids, every failed one, or the ignored ones "
    "of some types (after an upgrade that handles them).",
)
@click.argument("event_ids", nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Replay every failed event.")
@click.option(
    "--ignored",
    "ignored_types",
    multiple=True,
    metavar="TYPE",
    help="Replay the events of this type recorded as ignored (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Print what each would change; touch nothing.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
def events_replay(
    event_ids: tuple[str, ...],
    all_failed: bool,
    ignored_types: tuple[str, ...],
    dry_run: bool,
    limit: int,
) -> None:
    if [bool(event_ids), all_failed, bool(ignored_types)].count(True) != 1:
        raise click.UsageError("give event ids, --failed or --ignored (one of the three)")
    if all_failed:
        found = _read(ledger.failed_events, limit)
    elif ignored_types:
        found = _read(ledger.ignored_events, list(ignored_types), limit)
    else:
        found = _read(ledger.stored_events, list(event_ids))
    missing = sorted(set(event_ids) - {event.id for event in found})
    if dry_run:
        _preview(found)
    else:
        _replay(found)
    if missing:
        _fail(f"not found: {', '.join(missing)}")


def _preview(found: list[Any]) -> None:
    from worker import processing

    settings = _settings("DATABASE_URL")
    for event in found:
        if event.unstorable:
            # Only a stand-in was kept: applying it would say nothing about the event.
            _print_json(
                {
                    "id": event.id,
                    "type": event.type,
                    "outcome": None,
                    "reason": "not replayable: the database refused its payload "
                    f"({event.stored_error}); only DR can send it again",
                    "changes": [],
                }
            )
            continue
        try:
            result = processing.preview(settings, event)
        except (SQLAlchemyError, RefundSyncError) as exc:
            _fail(f"dry run of {event.id} failed: {exc}")
        _print_json(
            {
                "id": event.id,
                "type": event.type,
                "outcome": result.outcome.value if result.outcome else None,
                "reason": result.reason,
                "changes": [
                    {"entity": c.entity, "id": c.entity_id, "from": c.from_state, "to": c.to_state}
                    for c in result.changes
                ],
            }
        )


def _replay(found: list[Any]) -> None:
    from worker import processing

    settings = _settings("DATABASE_URL", "REDIS_URL")
    from worker.tasks import sender

    for event in found:
        if event.unstorable:
            click.echo(f"skipped {event.id} {event.type}: its payload could not be stored")
            continue
        # Requeue first, then publish: if publishing fails, the sweeper still finds the
        # event unfinished and publishes it later.
        try:
            with transaction(processing.engine(settings)) as conn:
                ledger.requeue(conn, event.id)
            sender("replay").stored([event])
        except SQLAlchemyError as exc:
            _fail(f"replay of {event.id} failed: {describe(exc)}")
        except OperationalError as exc:
            _fail(f"replay of {event.id} failed: broker unreachable ({exc})")
        click.echo(f"queued {event.id} {event.type}")


@main.group(help="Read the change feed: every change to a summary, as the commerce system gets it.")
def changes() -> None:
    pass


def _cursor(_: click.Context, param: click.Parameter, value: str | None) -> feed.Cursor | None:
    try:
        return feed.Cursor.parse(value) if value else None
    except feed.InvalidCursor as exc:
        raise click.BadParameter(str(exc), param=param) from None


@changes.command(
    "tail",
    help="Print changes as JSON lines, oldest first, from the cursor given (default: the oldest "
    "kept); the cursor to go on from goes to stderr. --follow keeps reading until Ctrl-C.",
)
@click.option("--after", callback=_cursor, help="A cursor from an earlier read.")
@click.option("--follow", is_flag=True, help="Wait for new changes instead of stopping.")
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds between reads while following.",
)
def changes_tail(after: feed.Cursor | None, follow: bool, interval: float) -> None:
    settings = _settings("DATABASE_URL")
    engine = make_engine(settings.database_url or "", pool_size=1, read_only=True)
    cursor = after
    try:
        while True:
            with engine.connect() as conn:
                page = feed.read(conn, cursor, 1000)
            for change in page.changes:
                _print_line(change)
            cursor = page.next
            if not page.changes:
                if not follow:
                    break
                time.sleep(interval)
    except feed.CursorExpired as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        _fail(f"database unavailable: {describe(exc)}")
    except KeyboardInterrupt:
        pass
    finally:
        engine.dispose()
        if cursor is not None:
            click.echo(f"next: {cursor.text}", err=True)


@main.group(
    "notify", help="Operate outbound webhooks: the changes POSTed to REFUNDSYNC_NOTIFY_URL."
)
def notify_group() -> None:
    pass


@notify_group.command(
    "failed", help="List changes whose delivery is dead, or failing still, oldest first."
)
@click.option("--dead", "dead_only", is_flag=True, help="Only the dead ones.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
def notify_failed(dead_only: bool, limit: int) -> None:
    for found in _read(outbox.failing, dead_only=dead_only, limit=limit):
        _print_line(
            {
                "cursor": found.cursor,
                "order": found.order_key,
                "version": found.version,
                "delivery": found.delivery,
                "attempts": found.attempts,
                "changedAt": iso(found.changed_at),
                "lastStatus": found.status,
                "lastError": found.error,
            }
        )


@notify_group.command(
    "redeliver",
    help="Send changes again (by cursor, the webhook-id the receiver saw), or every dead one; "
    "retried again for REFUNDSYNC_NOTIFY_MAX_AGE_SECONDS from now.",
)
@click.argument("cursors", nargs=-1)
@click.option("--dead", "all_dead", is_flag=True, help="Send every dead change again.")
def notify_redeliver(cursors: tuple[str, ...], all_dead: bool) -> None:
    if bool(cursors) == all_dead:
        raise click.UsageError("give cursors or --dead (one of the two)")
    try:
        named = [feed.Cursor.parse(cursor) for cursor in cursors]
    except feed.InvalidCursor as exc:
        raise click.UsageError(str(exc)) from None
    settings = _settings("DATABASE_URL", "REDIS_URL")
    if settings.notify_url is None:
        _fail("REFUNDSYNC_NOTIFY_URL is not set: there is nowhere to deliver to")
    from worker import processing
    from worker.app import app
    from worker.queue import republish

    try:
        with transaction(processing.engine(settings)) as conn:
            again = outbox.redeliver(conn, None if all_dead else named, datetime.now(UTC))
    except SQLAlchemyError as exc:
        _fail(f"database unavailable: {describe(exc)}")
    newest: dict[str, int] = {}
    for _, order_key, version in again:
        newest[order_key] = max(version, newest.get(order_key, 0))
    try:
        republish.announce(app, settings.queue, newest)
    except (OperationalError, RedisError):
        # Marked due already: beat's sweep sends them within REFUNDSYNC_SWEEP_INTERVAL_SECONDS.
        click.echo("broker unreachable: the sweep will send them", err=True)
    for cursor, order_key, version in again:
        click.echo(f"queued {cursor.text} {order_key}@{version}")
    missing = sorted({c.text for c in named} - {cursor.text for cursor, _, _ in again})
    if missing:
        _fail(f"not found (or never to be delivered): {', '.join(missing)}")


def _read(fn: Any, *args: Any, **kwargs: Any) -> Any:
    settings = _settings("DATABASE_URL")
    engine = make_engine(settings.database_url or "", pool_size=1)
    try:
        with engine.connect() as conn:
            return fn(conn, *args, **kwargs)
    except SQLAlchemyError as exc:
        _fail(f"database unavailable: {describe(exc)}")
    finally:
        engine.dispose()


def _instant(_: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO-8601 time option; one without an offset is read as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO-8601 time, e.g. 2024-05-01T00:00:00Z", param=param
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.command(
    help="Publish the events DR's Events API has that were never applied, from the "
    "checkpoint (minus the overlap) or --since; with --check-orders, compare refunded "
    "amounts with DR's orders instead. Needs DR_API_KEY."
)
@click.option(
    "--since",
    callback=_instant,
    default=None,
    metavar="ISO",
    help="List events created since then instead of since the checkpoint (a backfill). "
    "With --check-orders: orders changed since then (default: the last 24 hours).",
)
@click.option("--dry-run", is_flag=True, help="List and decide; record, publish, move nothing.")
@click.option(
    "--check-pending",
    is_flag=True,
    help="Fetch from DR's Refunds API the refunds pending longer than "
    "REFUNDSYNC_PENDING_CHECK_SECONDS, and publish those whose state changed.",
)
@click.option(
    "--check-orders",
    is_flag=True,
    help="Compare refundedAmount of recently changed orders with DR's GET /orders/{id}; "
    "exit 1 if any differs.",
)
@click.option(
    "--limit",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="With --check-orders: at most this many orders (one DR API call each).",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --check-orders: also write the drift gauge there (Prometheus text format).",
)
def reconcile(
    since: datetime | None,
    dry_run: bool,
    check_pending: bool,
    check_orders: bool,
    limit: int,
    metrics_file: Path | None,
) -> None:
    if check_orders and dry_run:
        raise click.UsageError("--check-orders only reads; --dry-run does not apply to it")
    if check_pending and (check_orders or dry_run or since is not None):
        raise click.UsageError("--check-pending goes alone")
    if metrics_file is not None and not check_orders:
        raise click.UsageError("--metrics-file goes with --check-orders")
    settings = (
        _settings("DATABASE_URL")
        if dry_run or check_orders
        else _settings("DATABASE_URL", "REDIS_URL")
    )
    if settings.dr_api_key is None:
        _fail("reconciliation is off: DR_API_KEY is not set (see docs/reconciliation.md)")
    if check_pending:
        _check_pending(settings)
    elif check_orders:
        _check_orders(settings, since, limit, metrics_file)
    else:
        _reconcile_events(settings, since, dry_run)


def _reconcile_events(settings: Settings, since: datetime | None, dry_run: bool) -> None:
    from worker import processing
    from worker.reconcile import run as job
    from worker.reconcile.dr_api import DRApiError

    def nowhere(*_: object) -> None:
        raise AssertionError("a dry run publishes nothing")

    engine = processing.engine(settings)
    try:
        publish: job.Publish = nowhere
        if not dry_run:
            # Imported only to publish: it loads the Celery app, which needs REDIS_URL.
            from worker.tasks import sender

            publish = sender("reconcile")
        with job.client_for(settings) as client:
            summary = job.run(settings, engine, client, publish, since=since, dry_run=dry_run)
    except DRApiError as exc:
        _fail(f"reconcile failed: {exc}; {_checkpoint_note(engine)}")
    except SQLAlchemyError as exc:
        _fail(f"reconcile failed: database unavailable: {describe(exc)}")
    except (OperationalError, RedisError, OSError) as exc:
        _fail(f"reconcile failed: broker unreachable ({exc}); {_checkpoint_note(engine)}")
    if summary is None:
        click.echo("reconcile: another reconcile is running; nothing published")
        return
    if summary.window.lost_from is not None:
        click.echo(
            f"refundsync: warning: events created from {_iso(summary.window.lost_from)} to"
            f" {_iso(summary.window.start)} are older than DR's 30 days and cannot be"
            " recovered from DR",
            err=True,
        )
    click.echo(f"reconcile{' (dry run)' if dry_run else ''}: {summary.line()}")


def _checkpoint_note(engine: Any) -> str:
    from worker.reconcile import run as job

    try:
        position = job.load_checkpoint(engine)
    except SQLAlchemyError:
        return "the checkpoint did not move past the failure"
    return f"checkpoint stays at {_iso(position) or 'none'}"


def _check_pending(settings: Settings) -> None:
    from worker import processing
    from worker.reconcile import pending
    from worker.reconcile import run as job
    from worker.reconcile.dr_api import DRApiError
    from worker.tasks import sender

    try:
        with job.client_for(settings) as client:
            summary = pending.check_pending(
                settings, processing.engine(settings), client, sender(pending.SOURCE)
            )
    except DRApiError as exc:
        _fail(f"pending check failed: {exc}")
    except SQLAlchemyError as exc:
        _fail(f"pending check failed: database unavailable: {describe(exc)}")
    except (OperationalError, RedisError, OSError) as exc:
        _fail(f"pending check failed: broker unreachable ({exc})")
    click.echo(f"check-pending: {summary.line()}")


def _check_orders(
    settings: Settings, since: datetime | None, limit: int, metrics_file: Path | None
) -> None:
    from worker import processing
    from worker.reconcile import run as job
    from worker.reconcile.dr_api import DRApiError

    since = since or datetime.now(UTC) - timedelta(hours=24)
    try:
        with job.client_for(settings) as client:
            report = job.check_orders(processing.engine(settings), client, since=since, limit=limit)
    except DRApiError as exc:
        _fail(f"order check failed: {exc}")
    except SQLAlchemyError as exc:
        _fail(f"order check failed: database unavailable: {describe(exc)}")
    for drift in report.mismatches:
        theirs = "not found" if drift.dr is None else str(drift.dr)
        click.echo(
            f"drift order={drift.order_id} currency={drift.currency}"
            f" refundedAmount={drift.ours} dr={theirs}"
        )
    click.echo(
        f"check-orders: checked={report.checked} mismatched={len(report.mismatches)}"
        f" since={_iso(since)} api_calls={report.api_calls}"
    )
    if metrics_file is not None:
        try:
            job.write_drift_metric(metrics_file, len(report.mismatches))
        except OSError as exc:
            _fail(f"cannot write {metrics_file}: {exc.strerror or exc}")
    if report.mismatches:
        _fail(f"{len(report.mismatches)} of {report.checked} orders differ from DR")


def _iso(value: datetime | None) -> str | None:
    """An instant as DR writes them (UTC, `Z`)."""
    return iso(value)


@main.command(
    help="Print a DigitalRiver-Signature header value for a payload file, signed with "
    "--secret, --secret-file, or else the first of DR_WEBHOOK_SECRETS."
)
@click.option(
    "--secret",
    default=None,
    help="A webhook signing secret. Other users can read it in `ps`: prefer --secret-file "
    "or DR_WEBHOOK_SECRETS.",
)
@click.option(
    "--secret-file",
    type=click.File("r"),
    default=None,
    help="A file whose first line is the secret ('-' for standard input).",
)
@click.option("--timestamp", type=int, default=None, help="Unix seconds (default: now).")
@click.argument("file", type=click.File("rb"))
def sign(secret: str | None, secret_file: Any, timestamp: int | None, file: Any) -> None:
    if secret is not None and secret_file is not None:
        raise click.UsageError("give --secret or --secret-file, not both")
    if secret_file is not None:
        secret = (secret_file.readline() or "").strip()
        if not secret:
            _fail("the secret file is empty")
    if secret is None:
        configured = _settings().secrets()
        if not configured:
            _fail("no secret: give --secret-file, or set DR_WEBHOOK_SECRETS")
        secret = configured[0]
    click.echo(make_signature(secret, file.read(), timestamp))


if __name__ == "__main__":
    main()

"""The Celery app (`celery -A worker.app worker|beat|flower`): `create_app(settings)`, and
`worker.app:app` built from the environment when first asked for. Importing this module
reads no settings, connects nothing and fills no registry.

Celery with Redis delivers at least once; these settings make sure that "at least" holds
even when a worker dies, and the convergence rule makes the "more than once" harmless.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from celery import Celery
from celery.signals import (
    beat_init,
    import_modules,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from models import logs, telemetry
from models.settings import Settings, load_or_exit
from models.telemetry import share_metrics_between_processes
from worker.policy import (
    BATCH_LIMIT,
    JOURNAL_SWEEP_S,
    RESTORE_SCAN_S,
    TASK_TIME_LIMIT_S,
    VISIBILITY_TIMEOUT_S,
)
from worker.queue import redis_transport, sqlite_transport
from worker.queue.connect import celery_broker, refuse_untrusted_redis
from worker.queue.contract import (
    JOURNAL_SWEEP_TASK,
    NOTIFY_SWEEP_TASK,
    PENDING_CHECK_TASK,
    PURGE_TASK,
    RECONCILE_TASK,
    SWEEP_TASK,
)

REDIS_TRANSPORT_OPTIONS = {
    "visibility_timeout": VISIBILITY_TIMEOUT_S,
    "unacked_restore_interval": RESTORE_SCAN_S,
    "unacked_restore_throttle": 1,
    # The restore mutex of a worker killed while holding it expires after this long
    # (kombu's default of 300 s alone would exceed the 5 minutes).
    "unacked_mutex_expire": 60,
    "socket_connect_timeout": 5,
    "socket_timeout": 15,
    "health_check_interval": 25,
}

# Set by the first use of `app` (see __getattr__): the app of this process, its settings,
# and whether it runs on the standalone mode's SQLite broker (worker.queue.sqlite_transport:
# one worker, no monitors).
app: Celery
settings: Settings
STANDALONE: bool
# The settings the hooks below run with: those create_app was given.
_hooked: Settings | None = None


def create_app(settings: Settings) -> Celery:
    """The Celery app for `settings`, with refundsync's process hooks connected."""
    # Before any connection exists: a message Redis stops delivering halfway is kept, not
    # lost.
    redis_transport.register()
    sqlite_transport.register()
    standalone = sqlite_transport.is_standalone(settings.redis_url or "")
    # Tasks are imported when a worker starts, not when a publisher imports the app.
    app = Celery("refundsync", set_as_current=True, include=["worker.tasks"])
    if standalone:
        broker = {
            "broker_url": settings.redis_url,
            "broker_transport_options": sqlite_transport.TRANSPORT_OPTIONS,
        }
    else:
        # Directly, over TLS or through Sentinel, as REDIS_URL says (worker.queue.connect).
        broker = celery_broker(settings.broker(), REDIS_TRANSPORT_OPTIONS)
    app.conf.update(
        **broker,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        # Acknowledge only after the event's outcome is committed; a worker process that dies
        # mid-task leaves its message to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Messages held per pool process: a batch on its way and the next one waiting
        # (worker.pool). A dead worker's are back after the visibility timeout. The
        # standalone mode applies one message at a time.
        worker_prefetch_multiplier=1 if standalone else 2 * BATCH_LIMIT,
        task_time_limit=TASK_TIME_LIMIT_S,
        # A task killed by that limit may have died inside the transaction that records its
        # event, leaving no trace: its message goes back on the queue (marked redelivered, so
        # it is tried with its attempt marked as started, and one that keeps timing out counts
        # as a poison event) instead of being acknowledged.
        task_acks_on_timeout=False,
        # Task events feed Flower; the SQLite broker has no fanout exchange to carry them.
        worker_send_task_events=not standalone,
        # Task events go out in batches (worker.pool).
        worker_consumer="worker.pool:Consumer",
        worker_enable_remote_control=not standalone,
        task_send_sent_event=False,
        enable_utc=True,
    )
    app.conf.beat_schedule = {
        "sweep-stuck-events": {
            "task": SWEEP_TASK,
            "schedule": float(settings.sweep_interval_seconds),
            # A sweep that could not run in time is skipped, never piled up.
            "options": {"expires": float(settings.sweep_interval_seconds)},
        },
    }
    # Retention runs whether or not webhooks go out: the feed is always written.
    app.conf.beat_schedule["purge-changes"] = {
        "task": PURGE_TASK,
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    }
    # Always: whether webhooks are on is the workers' setting (beat holds no secret), and a
    # sweep with nothing to send is one indexed query.
    app.conf.beat_schedule["sweep-deliveries"] = {
        "task": NOTIFY_SWEEP_TASK,
        "schedule": float(settings.sweep_interval_seconds),
        "options": {"expires": float(settings.sweep_interval_seconds)},
    }
    if not standalone:
        # The SQLite queue takes a message and marks it in one transaction: no journal.
        app.conf.beat_schedule["sweep-journal"] = {
            "task": JOURNAL_SWEEP_TASK,
            "schedule": float(JOURNAL_SWEEP_S),
            "options": {"expires": float(JOURNAL_SWEEP_S)},
        }
    if settings.dr_api_key is not None:
        # Reconciliation with DR's Events API needs a key; without one it is off
        # (docs/reconciliation.md).
        app.conf.beat_schedule["reconcile-events"] = {
            "task": RECONCILE_TASK,
            "schedule": float(settings.reconcile_interval_seconds),
            "options": {"expires": float(settings.reconcile_interval_seconds)},
        }
        # At most hourly: each refund is asked about once per REFUNDSYNC_PENDING_CHECK_SECONDS.
        every = float(min(settings.pending_check_seconds, 3600))
        app.conf.beat_schedule["check-pending-refunds"] = {
            "task": PENDING_CHECK_TASK,
            "schedule": every,
            "options": {"expires": every},
        }

    global _hooked
    _hooked = settings
    for signal, handler in _HOOKS:
        signal.connect(handler, weak=False)
    return app


def _settings() -> Settings:
    assert _hooked is not None  # noqa: S101 - hooks are connected by create_app only
    return _hooked


def __getattr__(name: str) -> Any:
    """`app`, `settings` and `STANDALONE`, made on first use from the environment (what
    `celery -A worker.app` and the tasks use)."""
    if name not in ("app", "settings", "STANDALONE"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = load_or_exit("REDIS_URL")
    globals().update(
        settings=loaded,
        STANDALONE=sqlite_transport.is_standalone(loaded.redis_url or ""),
        app=create_app(loaded),
    )
    return globals()[name]


def _logging(loglevel: str | None = None, **_: object) -> None:
    # Connected, this replaces Celery's own logging setup with refundsync's JSON lines.
    logs.configure(loglevel or "INFO")


def _reconcile_status(**_: object) -> None:
    from worker.reconcile.run import log_status

    log_status(_settings())


def _metrics_directory(**_: object) -> None:
    # Before the worker imports its tasks (and with them prometheus_client) and before the
    # pool forks, so every pool process counts into files the main process adds up.
    share_metrics_between_processes()


def _require_database(**_: object) -> None:
    # Flower and beat import this app without a database; a worker must not start without
    # one, or it would take messages it cannot record.
    refuse_untrusted_redis(load_or_exit("REDIS_URL", "DATABASE_URL"))


def _after_fork(**_: object) -> None:
    # Connections must never cross a fork; each pool process opens its own.
    from worker import notify, processing

    processing.reset_engine()
    notify.reset()
    freeze_startup_objects()


def _main_process_ready(**_: object) -> None:
    freeze_startup_objects()


def freeze_startup_objects() -> None:
    """Exempt what start-up built (modules, the app, settings, engines) from collection.

    A full collection walks every tracked object, about 180,000 once everything is
    imported: a pause of about 100 ms every minute or so at 200 events/s, during which
    events queue up. Frozen, those objects are never walked again, and a full collection
    only visits what was allocated since.
    """
    gc.freeze()


def _serve_metrics(**_: object) -> None:
    settings = _settings()
    if settings.metrics_addr:
        from worker import metrics

        try:
            metrics.serve(settings.metrics_addr)
        except (OSError, ValueError) as exc:
            # Another worker on this host may hold the port; events still flow.
            logging.getLogger("refundsync.worker").warning(
                "metrics.unavailable", extra={"address": settings.metrics_addr, "error": str(exc)}
            )


def _pool_process_gone(pid: int | None = None, **_: object) -> None:
    from worker import notify

    # A pool process that stops in order leaves no announcement unpublished.
    notify.flush()
    telemetry.forget_process(pid or os.getpid())


# refundsync's process hooks, connected by create_app.
_HOOKS = (
    (setup_logging, _logging),
    (beat_init, _reconcile_status),
    (worker_ready, _reconcile_status),
    (import_modules, _metrics_directory),
    (worker_init, _require_database),
    (worker_process_init, _after_fork),
    (worker_ready, _main_process_ready),
    (worker_ready, _serve_metrics),
    (worker_process_shutdown, _pool_process_gone),
)

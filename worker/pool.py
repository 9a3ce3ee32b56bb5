"""Every override of a Celery internal, in one place (Celery, kombu and billiard are capped
below their next minor release in pyproject.toml for them; the transports' overrides of
kombu are in worker.queue):

- `Batcher`: events.apply messages sent to the prefork pool together (billiard's
  ApplyResult._job/_cache, Request._apply_result, Celery's tracer arguments);
- `Consumer`: the worker's consumer, handing events.apply requests to the Batcher and
  publishing task events in batches (Consumer._flush_buffered_events);
- `PrivateRequest`: what monitors see of a task (Request.info).

events.apply messages sent to the pool together, and applied in one transaction.

Every message stays a task of its own. Celery receives and reserves it, reports it to
monitors, acknowledges it once its outcome is committed, retries it or puts it back, all
through its own Request, exactly as for a message sent to the pool alone. Only the trip to
the pool differs: messages that arrive while every pool process is busy wait here, and go
as one job (at most BATCH_LIMIT of them) to the next process that is free. The job applies
them in one transaction (processing.process_together); any it leaves, and all of them if
that transaction fails, run as the task itself, one by one.

When a process is free a message goes at once, alone: batches form only under load, where
they spare each event its own pool round trip, Postgres transaction and commit.

Celery buffers task events (`task-received`, `-started`, `-succeeded`, ...) and publishes
the buffer on the next turn of the event loop, which under load is one Redis round trip
(and one new redis-py client) for every event or two: almost half of the worker main
process's time at 200 events/s. Here the buffer waits up to EVENT_FLUSH_S, or until
Celery's own size limit flushes it, so one publish carries many events. Flower shows a
task that much later; nothing else reads these events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from time import monotonic
from typing import Any
from weakref import ref

from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated
from celery.app.trace import fast_trace_task, trace_task_ret
from celery.concurrency.prefork import TaskPool
from celery.exceptions import TaskRevokedError
from celery.utils.saferepr import saferepr
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request
from celery.worker.state import revoked
from kombu.serialization import loads, prepare_accept_content
from kombu.utils.uuid import uuid

from worker import notify, processing
from worker.app import STANDALONE, app, settings
from worker.policy import BATCH_LIMIT, DEFERRED, EVENT_FLUSH_S, TASK_TIME_LIMIT_S, Deferral
from worker.queue.contract import APPLY_TASK

log = logging.getLogger("refundsync.worker")

# A job starts running messages one by one (after their transaction together failed)
# only this long after it started; each is bounded well inside the rest of the time limit.
ALONE_BUDGET_S = TASK_TIME_LIMIT_S / 3

# What the pool process runs for one message: Celery's own arguments for its tracer.
Job = tuple[str, str, dict[str, Any], Any, str | None, str | None]

# What the tracer returns for one message: (failed, result or exception info, runtime).
Traced = tuple[int, Any, float]


def applies(pool: Any) -> bool:
    """Whether messages sent to this pool go through a Batcher: prefork pools, except in
    the standalone mode (one process on SQLite, where nothing is applied together)."""
    return isinstance(pool, TaskPool) and not STANDALONE


def submit(request: Request, pool: TaskPool) -> None:
    """Send a request to the pool, with others that wait for a free process."""
    batcher = _batcher(pool)
    if batcher is None:
        batcher = pool._refundsync_batcher = Batcher(pool)
    batcher.submit(request)


def hand_back_waiting(pool: Any) -> None:
    """When the worker stops consuming: queue the requests still waiting for a pool process
    again, as new messages, and acknowledge theirs.

    Left to the broker, each would come back marked redelivered, and be tried alone and in
    two transactions, as a message that may have killed its worker, though it never
    started. One whose message cannot be queued again is left to the broker so.
    """
    batcher = _batcher(pool)
    if batcher is None:
        return
    waiting, batcher.waiting = batcher.waiting, []
    for request in waiting:
        try:
            args, kwargs = _arguments(request.body, request.content_type, request.content_encoding)
            app.send_task(
                request.name,
                args=args,
                kwargs=kwargs,
                task_id=request.id,
                queue=(request.delivery_info or {}).get("routing_key") or settings.queue,
                argsrepr=request.argsrepr,
                kwargsrepr=request.kwargsrepr,
                retries=request.request_dict.get("retries", 0),
            )
            # At once, not on the next turn of an event loop that is stopping.
            request.message.ack()
            request.acknowledged = True
        except Exception:  # noqa: BLE001 - then the broker brings it back, as it would
            log.warning("batch.hand_back_failed", extra={"task_id": request.id})
    if waiting:
        log.info("batch.handed_back", extra={"messages": len(waiting)})


def forget_waiting(pool: Any) -> None:
    """Drop the requests waiting for a pool process, when the broker connection they came
    on is gone: they could not be acknowledged on it, and the broker delivers them again."""
    batcher = _batcher(pool)
    if batcher is not None:
        batcher.waiting.clear()


def _batcher(pool: Any) -> Batcher | None:
    """The pool's Batcher, once a request has gone through one."""
    found: Batcher | None = getattr(pool, "_refundsync_batcher", None)
    return found


class Batcher:
    """A worker main process's requests on their way to its pool.

    Runs in the worker's event loop only (message handlers, timers and pool callbacks all
    do), so it needs no lock.
    """

    def __init__(self, pool: TaskPool) -> None:
        self.pool = pool
        self.waiting: list[Request] = []
        # Jobs sent and not finished yet. Counted from the pool's own state each time, not
        # by callbacks: a job the pool discards unstarted (after a broker connection loss)
        # calls none.
        self.jobs: list[Any] = []

    def submit(self, request: Request) -> None:
        if request.revoked():
            raise TaskRevokedError(request.id)
        self.waiting.append(request)
        self._dispatch()

    def _busy(self) -> int:
        self.jobs = [job for job in self.jobs if not job.ready() and job._job in job._cache]
        return len(self.jobs)

    def _dispatch(self) -> None:
        while self.waiting and self._busy() < max(self.pool.num_processes, 1):
            batch = self._next_batch()
            # Revoked while waiting: Celery acknowledges and reports those itself.
            batch = [request for request in batch if not request.revoked()]
            if batch:
                self._send(batch)

    def _next_batch(self) -> list[Request]:
        # A message that comes back unacknowledged goes alone: if it is what killed its
        # pool process, it must not take others down with it again. Alone, its attempt is
        # marked as started before it is applied (worker.processing), so only its own
        # deaths count towards its quarantine.
        size = 0
        for request in self.waiting[:BATCH_LIMIT]:
            if _redelivered(request):
                size = size or 1
                break
            size += 1
        batch = self.waiting[:size]
        del self.waiting[:size]
        return batch

    def _send(self, batch: list[Request]) -> None:
        def each(call: Callable[[Request], Any]) -> None:
            for request in batch:
                try:
                    call(request)
                except Exception:
                    # One request's trouble (Celery logs its own) must not keep the
                    # others from being acknowledged or put back.
                    log.exception("batch.request_callback_failed", extra={"task_id": request.id})

        def on_accepted(pid: int, time_accepted: float) -> None:
            each(lambda request: request.on_accepted(pid, time_accepted))

        def on_return(results: list[Traced]) -> None:
            outcomes = iter(results)
            each(lambda request: request.on_success(next(outcomes)))
            self._dispatch()

        def on_error(exc_info: ExceptionInfo) -> None:
            # The job itself failed: its process died or was killed at the time limit, and
            # each request does what Celery does for a task that did (goes back on the
            # queue). Terminated is the exception: revoking one request with terminate
            # kills the job of all, and Celery would take each for revoked (acknowledged),
            # so those not revoked themselves go back on the queue.
            exc = getattr(exc_info.exception, "exc", exc_info.exception)
            if isinstance(exc, Terminated):
                each(
                    lambda request: (
                        request.on_failure(exc_info)
                        if request.id in revoked
                        else request.reject(requeue=True)
                    )
                )
            else:
                each(lambda request: request.on_failure(exc_info))
            self._dispatch()

        def on_timeout(soft: bool, timeout: float) -> None:
            each(lambda request: request.on_timeout(soft, timeout))

        first = batch[0]
        time_limit, soft_time_limit = first.time_limits
        job = self.pool.apply_async(
            run_batch,
            args=([job_of(request) for request in batch],),
            accept_callback=on_accepted,
            timeout_callback=on_timeout,
            callback=on_return,
            error_callback=on_error,
            soft_timeout=soft_time_limit or first.task.soft_time_limit,
            timeout=time_limit or first.task.time_limit,
            # Not a request's id: the pool terminates a job whose id is revoked, and that
            # is for Celery to do to the requests it means.
            correlation_id=uuid(),
        )
        if job is None:
            # Not sent (a pool shutting down): the messages stay unacknowledged, and go
            # back to the queue with the worker's connection.
            return
        self.jobs.append(job)
        # What Celery cancels or terminates a request through.
        weak = ref(job)
        for request in batch:
            request._apply_result = weak


def _redelivered(request: Request) -> bool:
    return bool((request.delivery_info or {}).get("redelivered"))


def job_of(request: Request) -> Job:
    """What Celery itself would send to the pool for this request."""
    return (
        request.type,
        request.id,
        request.request_dict,
        request.body,
        request.content_type,
        request.content_encoding,
    )


_accept: set[str] | None = None


def run_batch(jobs: list[Job]) -> list[Traced]:
    """In a pool process: apply the messages' events together, and run as the task itself
    every one that could not be; one traced result per message, in order."""
    started = monotonic()
    try:
        # A message alone runs as the task itself, with no parsing of it here first.
        results: list[processing.Result | None] = (
            processing.process_together(settings, [_copy(job) for job in jobs])
            if len(jobs) > 1
            else [None]
        )
    except Exception:
        # Nothing is lost: every message then runs as the task itself.
        log.exception("batch.failed")
        results = [None] * len(jobs)
    notify.announce(app, settings, results)
    together = sum(result is not None for result in results)
    runtime = (monotonic() - started) / max(together, 1)
    traced: list[Traced] = []
    for job, result in zip(jobs, results, strict=True):
        if result is not None:
            traced.append((0, saferepr(result.task_result), runtime))
        elif monotonic() - started < ALONE_BUDGET_S:
            traced.append(_trace(job))
        else:
            # Tried again later: a job past its time limit would be killed, and every one of
            # its messages sent back to be tried alone.
            traced.append(
                _trace(_deferred(job, "not tried: the messages sent with it took too long"))
            )
    return traced


def _deferred(job: Job, reason: str) -> Job:
    """The job with its request marked: the task hands the message back untried."""
    name, task_id, request, body, content_type, content_encoding = job
    marked = {**request, DEFERRED: Deferral(reason)}
    return (name, task_id, marked, body, content_type, content_encoding)


def _trace(job: Job) -> Traced:
    """Run the task itself for one message, as Celery does for a message sent alone."""
    trace = fast_trace_task if app.use_fast_trace_task else trace_task_ret
    try:
        traced: Traced = trace(*job)
    except Exception:  # noqa: BLE001
        # As Celery reports a tracer that fails for a message sent alone.
        return (1, ExceptionInfo(), 0.0)
    return traced


def _copy(job: Job) -> tuple[processing.Copy, dict[str, str]] | None:
    """The event copy a message carries, with its log labels; None if it is not one."""
    _, task_id, request, body, content_type, content_encoding = job
    try:
        args, kwargs = _arguments(body, content_type, content_encoding)
        copy = processing.copy_of(request.get("delivery_info"), task_id, *args, **kwargs)
    except Exception:  # noqa: BLE001 - the task itself meets (and reports) the same
        return None
    return copy, {"task_id": task_id}


def _arguments(
    body: Any, content_type: str | None, content_encoding: str | None
) -> tuple[list[Any], dict[str, Any]]:
    """A task message's positional and keyword arguments, decoded as Celery's tracer does."""
    global _accept
    if not content_type:
        args, kwargs, _ = body
        return args, kwargs
    if _accept is None:
        _accept = prepare_accept_content(app.conf.accept_content)
    args, kwargs, _ = loads(body, content_type, content_encoding, accept=_accept)
    return args, kwargs


class Consumer(CeleryConsumer):
    """Celery's consumer, with events.apply requests sent to the pool together and task
    events published in batches."""

    # When the scheduled flush is due (0: none is scheduled).
    _flush_due = 0.0

    def __init__(self, on_task_request: Any, *args: Any, **kwargs: Any) -> None:
        def handle(request: Request) -> None:
            if request.name != APPLY_TASK or not applies(self.pool):
                on_task_request(request)
                return
            # A revoked request was acknowledged and reported when it was found revoked.
            with suppress(TaskRevokedError):
                submit(request, self.pool)

        super().__init__(handle, *args, **kwargs)

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            return
        now = time.monotonic()
        # A flush is on its way, unless it is long overdue: a timer lost with the event
        # loop must not leave events in the buffer until Celery's size limit is reached.
        if self._flush_due and now < self._flush_due + 10 * EVENT_FLUSH_S:
            return
        self._flush_due = now + EVENT_FLUSH_S
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_due = 0.0
        self._flush_events()

    def stop(self) -> None:
        # The worker is stopping and takes no more messages: those waiting for a pool
        # process go back while the connection is still there to acknowledge them.
        hand_back_waiting(self.pool)
        super().stop()

    def on_close(self) -> None:
        # As Celery drops its reserved requests with the connection they came on.
        forget_waiting(self.pool)
        super().on_close()

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        # The last events of a stopping worker are not left in the buffer.
        if self._flush_due:
            self._flush_buffered_events()
        super().shutdown(*args, **kwargs)


class PrivateRequest(Request):
    """A task request that shows monitors its labels only.

    Flower's worker page asks workers for their reserved and scheduled tasks, which Celery
    answers with the real arguments unless asked for the safe view; the arguments hold the
    payload (customer names, emails, addresses), so the safe view is the only one.
    """

    def info(self, safe: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = super().info(safe=True)
        return info

"""How long a test waits for something, derived from the policy the service runs with.

Every wait in the suite polls a condition against one of these, never a fixed sleep. A
deadline is the longest the service's own policy allows for what is awaited, with the
slack a loaded 2-core CI machine needs; one that passes is a bug to find, not a number
to raise.
"""

from __future__ import annotations

from models.db import SQLITE_BUSY_TIMEOUT_S
from worker.policy import (
    MAX_RETRY_COUNTDOWN_S,
    RESTORE_SCAN_S,
    TASK_TIME_LIMIT_S,
    VISIBILITY_TIMEOUT_S,
)

# A local process (Redis, an ingest) answering, or stopping, once asked.
LOCAL_PROCESS_S = 10.0
# A Python process importing refundsync and starting (an ingest, a Celery worker, `run`).
PROCESS_START_S = 60.0
# One task on a running worker, which its hard time limit ends one way or another.
ONE_TASK_S = float(TASK_TIME_LIMIT_S)
# A queued event on a running worker: at most one task time limit for its own attempt and
# one for the job it waits behind (a batch of BATCH_LIMIT), plus a retry's longest backoff.
APPLY_S = 2 * TASK_TIME_LIMIT_S
# A backlog of a few thousand events on two single-process workers, with retries.
BACKLOG_S = 2 * APPLY_S
# A message held by a worker that died: back after the visibility timeout and the next
# restore scan, then applied.
REDELIVERY_S = VISIBILITY_TIMEOUT_S + RESTORE_SCAN_S + TASK_TIME_LIMIT_S
# Events after an outage (a database or broker back): the longest retry backoff has to run
# out, redelivered messages come back, and the backlog drains.
RECOVERY_S = REDELIVERY_S + MAX_RETRY_COUNTDOWN_S + APPLY_S
# The standalone mode: one worker applying a burst of events one at a time; an attempt
# that meets the database busy waits up to the busy timeout, then is tried again at once.
STANDALONE_APPLY_S = APPLY_S + 10 * SQLITE_BUSY_TIMEOUT_S

"""Loaded into a test worker with `--include tests.faults.poison`.

A refund whose reason is "poison-pill" kills the worker process in the middle of applying
it, as a crash in native code would: inside the transaction that applies it (alone or
together with others), before the outcome is committed.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from worker import processing

# The rules' apply, as the unit of work calls it (both alone and together).
_apply = vars(processing)["apply"]


def _crash_on_poison(state: Any, event: Any, plan: Any) -> Any:
    refund = plan.refund
    if refund is not None and refund.reason == "poison-pill":
        os.kill(os.getpid(), signal.SIGKILL)
    return _apply(state, event, plan)


vars(processing)["apply"] = _crash_on_poison

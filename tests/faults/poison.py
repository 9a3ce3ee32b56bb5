"""Loaded into a test worker with `--include tests.faults.poison`.

A refund whose reason is "poison-pill" kills the worker process in the middle of applying
it, as a crash in native code would: inside the transaction that applies it, before the
outcome is committed.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from worker import processing

_apply_locked = processing._apply_locked


def _crash_on_poison(conn: Any, settings: Any, event_id: str, data: Any, **kwargs: Any) -> Any:
    obj = data.get("data", {}).get("object", {}) if isinstance(data, dict) else {}
    if isinstance(obj, dict) and obj.get("reason") == "poison-pill":
        os.kill(os.getpid(), signal.SIGKILL)
    return _apply_locked(conn, settings, event_id, data, **kwargs)


processing._apply_locked = _crash_on_poison

"""The message contract between publishers (ingest, sweeper, replay) and the worker."""

from __future__ import annotations

from typing import Any

APPLY_TASK = "events.apply"
SWEEP_TASK = "events.sweep"
RECONCILE_TASK = "reconcile.events"


def apply_options(event_id: str, event_type: str) -> dict[str, Any]:
    """Publish options for an events.apply message.

    Monitors show `argsrepr` instead of the arguments; the arguments hold the raw payload,
    which carries customer names, emails and addresses, so monitors see id and type only.
    """
    return {
        "argsrepr": repr((event_id[:255], event_type[:255])),
        "kwargsrepr": "{}",
    }

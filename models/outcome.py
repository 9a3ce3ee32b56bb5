"""What processing did with an event: the words the rules, the ledger, the metrics and the
read API share."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """What processing did with an event."""

    QUEUED = "queued"
    APPLIED = "applied"
    STALE = "stale"
    IGNORED = "ignored"
    FAILED = "failed"


FINAL_OUTCOMES = frozenset({Outcome.APPLIED, Outcome.STALE, Outcome.IGNORED, Outcome.FAILED})

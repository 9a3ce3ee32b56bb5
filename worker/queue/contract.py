"""The message contract between publishers (ingest, sweeper, reconciliation, replay) and the
worker, and the seal that lets a worker trust a message.

An events.apply message carries `[body, received_at, source, seal]`. The seal is an
HMAC-SHA256 over the first three under a key kept in the database (`queue_keys`): every
refundsync process reaches the database, while Redis and its monitors (Flower can publish
any task) never see the key. A worker applies only messages whose seal verifies, so
whoever can write to Redis cannot have an event applied that DR did not sign (the ingest
verified it) or DR's API did not return (reconciliation) or that was not stored already
(replay, sweeper).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import orjson

APPLY_TASK = "events.apply"
SWEEP_TASK = "events.sweep"
RECONCILE_TASK = "reconcile.events"
PENDING_CHECK_TASK = "refunds.check_pending"
NOTIFY_TASK = "notify.deliver"
NOTIFY_SWEEP_TASK = "notify.sweep"
PURGE_TASK = "changes.purge"
JOURNAL_SWEEP_TASK = "journal.sweep"

_SEAL_VERSION = "v1="


def apply_options(event_id: str, event_type: str) -> dict[str, Any]:
    """Publish options for an events.apply message.

    Monitors show `argsrepr` instead of the arguments; the arguments hold the raw payload,
    which carries customer names, emails and addresses, so monitors see id and type only.
    """
    return {
        "argsrepr": repr((event_id[:255], event_type[:255])),
        "kwargsrepr": "{}",
    }


def notify_options(changes: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """Publish options for a notify.deliver message: monitors show the changes that
    announced it (order and version), never a summary."""
    labels = [f"{order_key[:255]}@{version}" for order_key, version in changes[:10]]
    if len(changes) > 10:
        labels.append(f"+{len(changes) - 10} more")
    return {"argsrepr": repr((labels,)), "kwargsrepr": "{}"}


def _mac(key: bytes, body: str, received_at: str, source: str) -> bytes:
    # Serialised as a JSON array: no choice of separator could make two different
    # argument lists sign alike.
    signed = orjson.dumps([body, received_at, source])
    return hmac.new(key, signed, hashlib.sha256).digest()


def seal(key: bytes, body: str, received_at: str, source: str) -> str:
    """The seal of an events.apply message's arguments under `key`."""
    return _SEAL_VERSION + base64.urlsafe_b64encode(_mac(key, body, received_at, source)).decode()


def apply_args(key: bytes, body: str, received_at: str, source: str) -> list[str]:
    """The positional arguments of an events.apply message, sealed."""
    return [body, received_at, source, seal(key, body, received_at, source)]


def sealed(keys: Sequence[bytes], given: object, body: str, received_at: str, source: str) -> bool:
    """Whether `given` is the seal of these arguments under one of `keys`."""
    if not isinstance(given, str) or not given.startswith(_SEAL_VERSION):
        return False
    try:
        mac = base64.urlsafe_b64decode(given[len(_SEAL_VERSION) :].encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    # Every key is tried, matched or not: the time taken tells nothing about which.
    matches = [hmac.compare_digest(mac, _mac(key, body, received_at, source)) for key in keys]
    return any(matches)

"""A process's queue keys: the newest seals new messages, every one verifies (the keys
themselves live in the database, models.trust)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from models.errors import ConfigError
from worker.queue.contract import sealed


class QueueKeys:
    """A process's queue keys, read on first use by `load` (which may raise the database's
    errors) and again whenever a seal does not verify: a key added since (a rotation) is
    then known before any message is refused. A forged message so costs one query more,
    beside the insert that records it."""

    def __init__(self, load: Callable[[], list[bytes]]) -> None:
        self._load = load
        self._keys: list[bytes] = []
        self._lock = threading.Lock()

    def _reload(self) -> list[bytes]:
        with self._lock:
            keys = self._load()
            if not keys:
                raise ConfigError("no queue key: run `refundsync migrate`")
            self._keys = keys
            return keys

    def signing_key(self) -> bytes:
        """The newest key: what new messages are sealed with."""
        return (self._keys or self._reload())[0]

    def verifies(self, seal: object, body: str, received_at: str, source: str) -> bool:
        """Whether `seal` is a valid seal of these arguments."""
        keys = self._keys or self._reload()
        if sealed(keys, seal, body, received_at, source):
            return True
        return sealed(self._reload(), seal, body, received_at, source)

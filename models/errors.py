"""The error tree: permanent errors are recorded and never retried; transient ones are."""


class RefundSyncError(Exception):
    """A refundsync error."""


class ConfigError(RefundSyncError):
    """The configuration is incomplete or invalid."""


class PermanentError(RefundSyncError):
    """Processing this event again would fail the same way; it is recorded as failed."""


class InvalidEvent(PermanentError):
    """The event is not valid for its type."""


class TransientError(RefundSyncError):
    """A passing failure (connection lost, deadlock, lock timeout); the event is retried."""


class Deferred(TransientError):
    """Not tried at all, to be tried later: no retry is counted against the event."""


class DatabaseBusy(TransientError):
    """Another writer held the database past the wait for it (SQLite's busy timeout, in the
    standalone mode): the wait has already happened, so the event is tried again at once
    rather than after a backoff meant for a database that is gone."""

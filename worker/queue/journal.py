"""The ingest's journal: every event the ingest answers 202 for is also kept in Redis until
Postgres has recorded it, so an event whose queue message is lost on its way to a worker is
published again without DR's help.

A message can be lost after Redis took it: a worker killed between kombu's `BRPOP` and its
note of the message as unacknowledged takes it along (kombu's Redis transport leaves that
window open), and Celery's warm shutdown has known drops of its own. The ingest writes the
message and a journal entry in one Lua script, so Redis holds both or neither; the
`journal.sweep` beat task then removes the entries whose events Postgres has recorded, and
publishes again the ones it has not recorded after the grace period.

Two keys beside the queue: `<queue>:journal`, a hash of event id -> the queue message
itself (it holds the raw body and received time, what publishing again needs, and the
ingest sends it to Redis once for both), and `<queue>:journal:at`, a sorted set of event
id -> when the entry was written or last published (Unix milliseconds).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

# KEYS: queue, entries, times. ARGV: now (ms), cap, then message and event id per event.
# Entries are written while the journal holds fewer than `cap`; the messages always go on
# the queue, in the order given, as one LPUSH per chunk (Lua's stack limits unpack()).
# Returns how many events were queued without an entry.
PUSH_SCRIPT = """
local room = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[3])
local skipped = 0
local messages = {}
for i = 3, #ARGV, 2 do
  messages[#messages + 1] = ARGV[i]
  if room > 0 then
    room = room - redis.call('ZADD', KEYS[3], ARGV[1], ARGV[i + 1])
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i])
  else
    skipped = skipped + 1
  end
end
for first = 1, #messages, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(messages, first, math.min(first + 999, #messages)))
end
return skipped
"""


@dataclass(frozen=True)
class JournalKeys:
    """The journal's two keys for a queue."""

    queue: str

    @property
    def entries(self) -> str:
        return f"{self.queue}:journal"

    @property
    def times(self) -> str:
        return f"{self.queue}:journal:at"

    @property
    def lock(self) -> str:
        return f"{self.queue}:journal:lock"

    def script_keys(self) -> list[str]:
        """KEYS of PUSH_SCRIPT."""
        return [self.queue, self.entries, self.times]


@dataclass(frozen=True)
class Entry:
    """What publishing an event again needs."""

    event_id: str
    event_type: str
    body: str
    received_at: str


def _args(message: bytes | str) -> list[Any]:
    """The positional arguments of a queued events.apply message (kombu's Redis envelope,
    its body the base64 of Celery's [args, kwargs, embed])."""
    envelope = orjson.loads(message)
    args = orjson.loads(base64.b64decode(envelope["body"]))[0]
    if not isinstance(args, list):
        raise TypeError("not an argument list")
    return args


def decode(event_id: str, raw: bytes | str | None) -> Entry | None:
    """The entry stored under `event_id` (the ingest's message), or None if it is missing
    or not one."""
    if raw is None:
        return None
    try:
        body, received_at = _args(raw)[:2]
        event_type = orjson.loads(body)["type"]
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, IndexError):
        return None
    if not all(isinstance(part, str) for part in (received_at, event_type, body)):
        return None
    try:
        # Publishing again parses it: an entry it cannot parse is unreadable here, not a
        # failure that would stop every sweep at the same entry.
        datetime.fromisoformat(received_at)
    except ValueError:
        return None
    return Entry(event_id, event_type, body, received_at)


def received_ms(message: bytes | str | None) -> float | None:
    """When the event in a queued events.apply message was received (Unix ms), or None if
    the message is not one (another task, or unreadable)."""
    if message is None:
        return None
    try:
        return datetime.fromisoformat(_args(message)[1]).timestamp() * 1000
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, IndexError):
        return None


@dataclass(frozen=True)
class Plan:
    """What a sweep does with the entries it read."""

    remove: list[str]
    republish: list[str]


def plan(
    entries: Sequence[tuple[str, float]],
    recorded: set[str],
    now_ms: float,
    grace_s: float,
    queue_tail_ms: float | None,
) -> Plan:
    """Entries whose events Postgres recorded leave the journal; the others are published
    again once they are older than the grace period and older than the oldest message
    still waiting in the queue (`queue_tail_ms`): the queue is first in, first out, so an
    entry newer than that may still be waiting there, behind a backlog."""
    remove = [event_id for event_id, _ in entries if event_id in recorded]
    due = now_ms - grace_s * 1000
    if queue_tail_ms is not None:
        due = min(due, queue_tail_ms - 1)
    republish = [event_id for event_id, at in entries if event_id not in recorded and at <= due]
    return Plan(remove, republish)


@dataclass
class Swept:
    """What one sweep did."""

    removed: int = 0
    republished: int = 0
    unreadable: int = 0


# Entries read per round of a sweep; a sweep goes on while rounds come back full.
SWEEP_BATCH = 5000
# An entry younger than this is not looked up: its event is most likely on its way.
CHECK_AFTER_S = 5.0


# How long a sweep may hold the journal's lock: beat starts one every JOURNAL_SWEEP_S, and
# two at once would publish the same entries twice.
LOCK_S = 300


def locked_sweep(client: Any, keys: JournalKeys, *args: Any, **kwargs: Any) -> Swept | None:
    """`sweep` under a lock in Redis; None if another sweep holds it."""
    token = uuid.uuid4().hex
    if not client.set(keys.lock, token, nx=True, px=LOCK_S * 1000):
        return None
    try:
        return sweep(client, keys, *args, **kwargs)
    finally:
        # Released only if still ours (it may have expired and been taken since).
        client.eval(_RELEASE, 1, keys.lock, token)


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def sweep(
    client: Any,
    keys: JournalKeys,
    recorded: Callable[[list[str]], set[str]],
    republish: Callable[[Entry], None],
    now_ms: Callable[[], float],
    grace_s: float,
) -> Swept:
    """One pass over the journal with a synchronous redis-py client (see `plan`).

    `recorded` says which event ids Postgres has; `republish` queues an entry again. An
    entry published again is stamped with the time, so it waits out the grace period once
    more before the next copy."""
    swept = Swept()
    # Rounds start at the last score read, inclusive: the events of one push share their
    # millisecond, and a round may end inside them. Entries already read are skipped.
    after = "-inf"
    seen: set[str] = set()
    while True:
        now = now_ms()
        read: list[tuple[bytes, float]] = client.zrangebyscore(
            keys.times,
            after,
            now - CHECK_AFTER_S * 1000,
            start=0,
            num=SWEEP_BATCH,
            withscores=True,
        )
        entries = [(member.decode(), score) for member, score in read]
        fresh = [(event_id, score) for event_id, score in entries if event_id not in seen]
        if not fresh:
            return swept
        seen.update(event_id for event_id, _ in fresh)
        after = repr(entries[-1][1])
        tail = received_ms(client.lindex(keys.queue, -1))
        decided = plan(fresh, recorded([event_id for event_id, _ in fresh]), now, grace_s, tail)
        if decided.remove:
            _forget(client, keys, decided.remove)
            swept.removed += len(decided.remove)
        if decided.republish:
            raws = client.hmget(keys.entries, decided.republish)
            lost: list[str] = []
            for event_id, raw in zip(decided.republish, raws, strict=True):
                entry = decode(event_id, raw)
                if entry is None:
                    lost.append(event_id)
                    continue
                republish(entry)
                client.zadd(keys.times, {event_id: now_ms()}, xx=True)
                swept.republished += 1
            if lost:
                _forget(client, keys, lost)
                swept.unreadable += len(lost)
        if len(read) < SWEEP_BATCH:
            return swept


def _forget(client: Any, keys: JournalKeys, event_ids: list[str]) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.zrem(keys.times, *event_ids)
    pipe.hdel(keys.entries, *event_ids)
    pipe.execute()


@dataclass(frozen=True)
class State:
    """The journal's size and the age of its oldest entry (seconds; 0 when empty)."""

    size: int
    oldest_age_s: float


def state_of(size: int, oldest: Sequence[tuple[Any, float]], now_ms: float) -> State:
    """State from ZCARD and `ZRANGE times 0 0 WITHSCORES`."""
    if not oldest:
        return State(size, 0.0)
    return State(size, max(0.0, (now_ms - oldest[0][1]) / 1000))

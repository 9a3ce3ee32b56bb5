"""The journal's pure parts: what a sweep does with the entries it read, the entry format,
and REDIS_URL's forms (models.brokers)."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime

import pytest

from models.brokers import redis_target
from models.errors import ConfigError
from worker.queue.journal import Entry, decode, plan, received_ms
from worker.queue.keys import QueueKeys
from worker.queue.publish import Publisher

NOW = 1_000_000_000.0
GRACE = 120


def test_recorded_entries_leave_whatever_their_age() -> None:
    decided = plan([("a", NOW - 10_000), ("b", NOW - 500_000)], {"a", "b"}, NOW, GRACE, None)
    assert decided.remove == ["a", "b"]
    assert decided.republish == []


def test_an_unrecorded_entry_is_published_again_only_after_the_grace_period() -> None:
    entries = [("young", NOW - GRACE * 1000 + 1), ("old", NOW - GRACE * 1000)]
    decided = plan(entries, set(), NOW, GRACE, None)
    assert decided.remove == []
    assert decided.republish == ["old"]


def test_an_entry_newer_than_the_oldest_waiting_message_may_still_be_queued() -> None:
    # A backlog: the oldest message in the queue was received 10 minutes ago, so entries
    # written after it may be behind it, and are left alone however old.
    tail = NOW - 600_000
    entries = [("before", tail - 1_000), ("same", tail), ("after", tail + 1_000)]
    decided = plan(entries, set(), NOW, GRACE, tail)
    assert decided.republish == ["before"]


def test_an_entry_is_the_ingests_message_and_damaged_ones_are_refused() -> None:
    publisher = Publisher("redis://127.0.0.1:1/0", "q", QueueKeys(lambda: [b"k" * 32]))
    body = '{"id":"e1","type":"refund.complete"}'
    raw = publisher.message(b"k" * 32, body, "e1", "refund.complete", "2026-12-07T10:00:00+00:00")
    assert decode("e1", raw) == Entry("e1", "refund.complete", body, "2026-12-07T10:00:00+00:00")
    assert decode("e1", None) is None
    assert decode("e1", b"not json") is None
    assert decode("e1", b'{"body": "bm90IGpzb24="}') is None
    assert decode("e1", b'{"a": 1}') is None
    # A received time publishing again could not parse makes the entry unreadable.
    damaged = publisher.message(b"k" * 32, body, "e1", "refund.complete", "yesterday")
    assert decode("e1", damaged) is None


def test_received_time_is_read_from_the_ingests_message() -> None:
    publisher = Publisher("redis://127.0.0.1:1/0", "q", QueueKeys(lambda: [b"k" * 32]))
    received = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)
    message = publisher.message(b"k" * 32, "{}", "e1", "refund.complete", received.isoformat())
    assert received_ms(message) == received.timestamp() * 1000
    assert received_ms(None) is None
    assert received_ms(b'{"body": "bm90IGpzb24="}') is None
    assert received_ms(b"[]") is None


def test_redis_url_forms() -> None:
    plain = redis_target("redis://:pw@10.0.0.1:6380/3")
    assert (plain.host, plain.port, plain.db, plain.password, plain.tls) == (
        "10.0.0.1",
        6380,
        3,
        "pw",
        None,
    )
    assert not plain.sentinel

    tls = redis_target("rediss://redis.internal:6380/0?ssl_ca_certs=/etc/ca.pem")
    assert tls.url == "rediss://redis.internal:6380/0"
    assert tls.tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert tls.connection_kwargs()["ssl"] is True

    sentinels = redis_target("sentinel://s1:26379;sentinel://s2:26380/2", "orders")
    assert sentinels.sentinels == (("s1", 26379), ("s2", 26380))
    assert (sentinels.master, sentinels.db, sentinels.sentinel) == ("orders", 2, True)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:6379", "must be redis://"),
        ("http://redis:6379", "must be redis://"),
        ("redis://redis:6379/zero", "database must be a number"),
        ("redis://redis:6379/0?ssl_ca_certs=/ca.pem", "need a rediss:// URL"),
        ("rediss://redis:6379/0?ssl_ca_cert=/ca.pem", "unknown option 'ssl_ca_cert'"),
        ("rediss://redis:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        ("sentinel://s1:26379;redis://s2:6379", "each Sentinel must be"),
        ("redis://redis:99999/0", "invalid port"),
    ],
)
def test_a_bad_redis_url_is_named_in_one_line(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        redis_target(url)

"""The console's wrong-password throttle: free attempts, then waits that double up to a
cap, a success forgets the address, and memory stays bounded however many addresses try."""

from __future__ import annotations

from ingest import console
from ingest.console import FREE_FAILURES, LOCKOUT_MAX_S, Throttle


def test_waits_start_after_the_free_attempts_and_double_up_to_the_cap() -> None:
    throttle = Throttle()
    for _ in range(FREE_FAILURES):
        throttle.failed("a")
        assert throttle.wait_s("a") == 0
    waits = []
    for _ in range(12):
        throttle.failed("a")
        waits.append(throttle.wait_s("a"))
    assert 1.5 < waits[0] <= 2
    assert 3.5 < waits[1] <= 4
    assert LOCKOUT_MAX_S - 1 < waits[-1] <= LOCKOUT_MAX_S
    assert throttle.wait_s("b") == 0
    throttle.succeeded("a")
    assert throttle.wait_s("a") == 0


def test_addresses_no_longer_waiting_are_forgotten_past_the_limit(monkeypatch) -> None:
    monkeypatch.setattr(console, "THROTTLE_ADDRESSES", 100)
    throttle = Throttle()
    for _ in range(FREE_FAILURES + 1):
        throttle.failed("blocked")
    for n in range(500):
        throttle.failed(f"guess-{n}")
    assert len(throttle._seen) <= 101
    assert throttle.wait_s("blocked") > 0

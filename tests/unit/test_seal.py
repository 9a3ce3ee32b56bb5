"""The seal of events.apply messages (worker.queue.contract) and the keys that make it
(worker.queue.keys.QueueKeys): pure, no processes."""

from __future__ import annotations

import pytest

from models.errors import ConfigError
from worker.queue.contract import apply_args, seal, sealed
from worker.queue.keys import QueueKeys

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
ARGS = ('{"id": "evt-1", "type": "refund.complete"}', "2024-05-14T10:00:00+00:00", "webhook")


def test_a_seal_verifies_its_own_arguments_under_its_key() -> None:
    assert sealed([KEY], seal(KEY, *ARGS), *ARGS)
    assert apply_args(KEY, *ARGS) == [*ARGS, seal(KEY, *ARGS)]


def test_any_configured_key_verifies() -> None:
    assert sealed([OTHER, KEY], seal(KEY, *ARGS), *ARGS)
    assert not sealed([OTHER], seal(KEY, *ARGS), *ARGS)
    assert not sealed([], seal(KEY, *ARGS), *ARGS)


@pytest.mark.parametrize("changed", [0, 1, 2])
def test_changing_any_argument_breaks_the_seal(changed: int) -> None:
    other = list(ARGS)
    other[changed] += " "
    assert not sealed([KEY], seal(KEY, *ARGS), *other)


def test_arguments_cannot_be_shifted_between_fields() -> None:
    # "ab" + "c" and "a" + "bc" must not sign alike.
    assert not sealed([KEY], seal(KEY, "ab", "c", "webhook"), "a", "bc", "webhook")


@pytest.mark.parametrize(
    "given",
    [None, "", 42, ["v1="], "v1=", "v1=!!!", "v2=" + seal(KEY, *ARGS)[3:], seal(KEY, *ARGS)[3:]],
)
def test_malformed_seals_never_verify(given: object) -> None:
    assert not sealed([KEY], given, *ARGS)


def test_keys_are_read_once_then_again_only_for_a_seal_they_do_not_verify() -> None:
    stored = [KEY]
    reads: list[int] = []

    def load() -> list[bytes]:
        reads.append(1)
        return list(stored)

    keys = QueueKeys(load)
    assert keys.signing_key() == KEY
    assert keys.verifies(seal(KEY, *ARGS), *ARGS)
    assert len(reads) == 1
    # A key added since (a rotation): a message sealed with it is accepted, not refused.
    stored.insert(0, OTHER)
    assert keys.verifies(seal(OTHER, *ARGS), *ARGS)
    assert len(reads) == 2
    assert keys.signing_key() == OTHER
    assert not keys.verifies("v1=forged", *ARGS)


def test_no_key_at_all_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="migrate"):
        QueueKeys(list).signing_key()

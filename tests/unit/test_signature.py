"""The DigitalRiver-Signature check, as pure functions."""

from __future__ import annotations

import pytest

from models.signature import SignatureError, compute, sign, verify

BODY = b'{"id":"evt_1","type":"refund.complete"}'
NOW = 1_716_000_000


def _header(segment: str, *signatures: str) -> str:
    return ", ".join([segment, *signatures])


@pytest.mark.parametrize(
    "header",
    [
        _header(f"t={NOW}", compute("s1", f"t={NOW}", BODY)),
        _header(f"{NOW}", compute("s1", f"{NOW}", BODY)),
        _header(f"t={NOW}", "v0=" + compute("s1", f"t={NOW}", BODY)),
        _header(f"t={NOW}", "v1=" + compute("s1", f"t={NOW}", BODY)),
        _header(f"t={NOW}", "v0=bogus", compute("s1", f"t={NOW}", BODY)),
        f"t={NOW},{compute('s1', f't={NOW}', BODY)}",
        _header(f"t={NOW}000", compute("s1", f"t={NOW}000", BODY)),
    ],
    ids=["t_prefix", "bare_seconds", "v0", "v1", "second_candidate", "no_space", "milliseconds"],
)
def test_accepted_header_shapes(header: str) -> None:
    verify(header, BODY, ["s1"], tolerance_s=300, now=NOW)


def test_any_configured_secret_matches() -> None:
    header = sign("rotating", BODY, NOW)
    verify(header, BODY, ["current", "rotating"], tolerance_s=300, now=NOW)


@pytest.mark.parametrize(
    ("header", "body", "now", "message"),
    [
        (None, BODY, NOW, "missing"),
        ("", BODY, NOW, "missing"),
        (f"t={NOW}", BODY, NOW, "no signature"),
        (sign("s1", BODY, NOW), BODY + b" ", NOW, "does not match"),
        (sign("other", BODY, NOW), BODY, NOW, "does not match"),
        (sign("s1", BODY, NOW), BODY, NOW + 301, "tolerance"),
        (sign("s1", BODY, NOW), BODY, NOW - 301, "tolerance"),
        ("t=abc,xyz", BODY, NOW, "malformed"),
        ("t=-5,xyz", BODY, NOW, "malformed"),
    ],
    ids=[
        "none",
        "empty",
        "timestamp_only",
        "tampered_body",
        "wrong_secret",
        "too_old",
        "too_far_ahead",
        "non_numeric_timestamp",
        "negative_timestamp",
    ],
)
def test_refused_headers(header: str | None, body: bytes, now: int, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        verify(header, body, ["s1"], tolerance_s=300, now=now)


def test_signature_covers_the_timestamp_segment_as_sent() -> None:
    signature = compute("s1", f"t={NOW}", BODY)
    with pytest.raises(SignatureError):
        verify(_header(f"{NOW}", signature), BODY, ["s1"], tolerance_s=300, now=NOW)


def test_within_tolerance_in_both_directions() -> None:
    header = sign("s1", BODY, NOW)
    verify(header, BODY, ["s1"], tolerance_s=300, now=NOW + 300)
    verify(header, BODY, ["s1"], tolerance_s=300, now=NOW - 300)

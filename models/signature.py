"""DR's webhook signature (`DigitalRiver-Signature`).

Header: segments separated by commas. The first is the timestamp (`t=<unix seconds>` or
bare seconds); each later one is a candidate signature, optionally `v0=`/`v1=`-prefixed.
Signed message: `<first segment exactly as sent>.<raw body>`; signature: standard Base64
of HMAC-SHA256 keyed by the secret's UTF-8 bytes. The raw bytes are signed, never
re-serialised JSON.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence

from models.errors import RefundSyncError

HEADER = "DigitalRiver-Signature"
# DR has not said whether its timestamp is in seconds or milliseconds; a value this large
# is milliseconds (as seconds it would be past the year 5000).
_MILLISECONDS_FROM = 100_000_000_000
_PREFIXES = ("v0=", "v1=")


class SignatureError(RefundSyncError):
    """The signature is missing, malformed, wrong, or outside the tolerance."""


def compute(secret: str, timestamp_segment: str, body: bytes) -> str:
    """Base64 HMAC-SHA256 of `<timestamp segment>.<body>`."""
    message = timestamp_segment.encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """A header value DR would send for `body`, for tests and curl examples."""
    segment = f"t={int(time.time()) if timestamp is None else timestamp}"
    return f"{segment},v0={compute(secret, segment, body)}"


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[str],
    *,
    tolerance_s: int,
    now: float | None = None,
) -> None:
    """Return when some candidate matches some secret within the tolerance; else raise."""
    if not header:
        raise SignatureError(f"{HEADER} header is missing")
    segments = [segment.strip() for segment in header.split(",")]
    if len(segments) < 2:
        raise SignatureError(f"{HEADER} has no signature")
    timestamp_segment = segments[0]
    raw_ts = timestamp_segment.removeprefix("t=")
    if not (raw_ts.isascii() and raw_ts.isdecimal()) or len(raw_ts) > 16:
        raise SignatureError(f"{HEADER} timestamp is malformed")
    stamp = int(raw_ts)
    if stamp >= _MILLISECONDS_FROM:
        stamp //= 1000
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance_s:
        raise SignatureError(f"{HEADER} timestamp is outside the {tolerance_s}s tolerance")
    # Compared as bytes: compare_digest refuses non-ASCII text, and a header may hold any.
    candidates = [_strip_prefix(segment).encode() for segment in segments[1:]]
    for secret in secrets:
        expected = compute(secret, timestamp_segment, body).encode()
        # Check every candidate so the time taken does not reveal which one matched.
        matched = [hmac.compare_digest(expected, candidate) for candidate in candidates]
        if any(matched):
            return
    raise SignatureError(f"{HEADER} does not match")


def _strip_prefix(segment: str) -> str:
    for prefix in _PREFIXES:
        if segment.startswith(prefix):
            return segment[len(prefix) :]
    return segment

"""Prometheus metrics of the ingest process."""

from __future__ import annotations

from prometheus_client import Counter

WEBHOOKS = Counter(
    "refundsync_webhooks_received_total", "Webhook requests answered, by status code", ["code"]
)
SIGNATURE_FAILURES = Counter(
    "refundsync_signature_failures_total", "Webhook requests refused for their signature"
)

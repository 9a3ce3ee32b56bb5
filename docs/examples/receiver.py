"""An example receiver of refundsync's outbound webhooks, to adapt: it verifies each request
with the Standard Webhooks reference implementation, then keeps every order's newest refund
summary in a SQLite table (replace `save` with your commerce system's update).

    pip install standardwebhooks
    REFUNDSYNC_NOTIFY_SECRET=whsec_... python docs/examples/receiver.py --port 8080 --db shop.db

and run refundsync with REFUNDSYNC_NOTIFY_URL=http://<this host>:8080/ and the same secret.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

SCHEMA = """CREATE TABLE IF NOT EXISTS refund_summaries (
    order_key TEXT PRIMARY KEY, version INTEGER NOT NULL, summary TEXT NOT NULL)"""


def save(db: sqlite3.Connection, change: dict) -> None:
    """Keep the change unless the order already has this version or a newer one: a retry, a
    redelivery or an older change arriving late then changes nothing."""
    order_key = change["orderId"] or change["invoiceId"]
    with db:
        db.execute(
            "INSERT INTO refund_summaries VALUES (?, ?, ?) ON CONFLICT (order_key) DO UPDATE"
            " SET version = excluded.version, summary = excluded.summary"
            " WHERE excluded.version > refund_summaries.version",
            (order_key, change["version"], json.dumps(change["summary"])),
        )


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            # Checks the signature and that the timestamp is within 5 minutes.
            message = WEBHOOK.verify(body, dict(self.headers))
        except WebhookVerificationError:
            self.send_response(401)
            self.end_headers()
            return
        if message["type"] == "order.refund_summary.updated":
            db = sqlite3.connect(ARGS.db)
            try:
                save(db, message["data"])
            finally:
                db.close()
        # Any 2xx ends the delivery; anything else, or no answer in time, is retried.
        self.send_response(204)
        self.end_headers()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", default="shop.db")
    ARGS = parser.parse_args()
    WEBHOOK = Webhook(os.environ["REFUNDSYNC_NOTIFY_SECRET"])
    with sqlite3.connect(ARGS.db) as setup:
        setup.execute(SCHEMA)
    ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler).serve_forever()

-- One event's database work in refundsync, as its worker sends it (run with -M prepared, as
-- psycopg prepares the worker's statements): one transaction that records the copy
-- (locking the event row), locks the order and reads its refunds, entries and chargebacks,
-- then writes the order, a refund, a history row and the outcome.
\set n random(1, 2000000000)
\set o random(1, 2000)
BEGIN;
INSERT INTO webhook_events (id, type, created_time, live_mode, payload, outcome, deliveries,
    attempts, lost_attempts, source, received_at)
  VALUES ('pgb-' || :n, 'refund.pending', now(), false,
    '{"id": "pgb", "type": "refund.pending", "data": {"object": {"id": "re-1", "orderId": "o-1", "amount": 10.0, "currency": "USD", "state": "pending", "items": [{"sku": "s", "amount": 10.0, "quantity": 1}], "reason": "customer request", "createdTime": "2026-11-28T00:00:00Z"}}, "createdTime": "2026-11-28T00:00:00Z", "liveMode": false}',
    'queued', 1, 1, 0, 'webhook', now())
  ON CONFLICT (id) DO UPDATE SET deliveries = webhook_events.deliveries + 1
  RETURNING outcome, attempts, lost_attempts, type, error;
SELECT * FROM orders WHERE id = 'pgb-o' || :o FOR UPDATE;
SELECT 'refund' AS kind, id, state, amount, refunded_amount, last_event_id, last_event_time
  FROM refunds WHERE order_id = 'pgb-o' || :o
UNION ALL SELECT 'entry', entry_key, state, amount, NULL, last_event_id, last_event_time
  FROM charge_refunds WHERE order_id = 'pgb-o' || :o
UNION ALL SELECT 'chargeback', id, NULL, amount, NULL, last_event_id, last_event_time
  FROM chargebacks WHERE order_id = 'pgb-o' || :o;
INSERT INTO orders (id) VALUES ('pgb-o' || :o) ON CONFLICT DO NOTHING;
UPDATE orders SET currency = 'USD', updated_at = now() WHERE id = 'pgb-o' || :o;
INSERT INTO refunds (order_id, id, state, amount, refunded_amount, last_event_id, last_event_time)
  VALUES ('pgb-o' || :o, 're-' || :n, 'pending', 10.00, 0, 'pgb-' || :n, now())
  ON CONFLICT (order_id, id) DO UPDATE SET state = excluded.state;
INSERT INTO refund_history (order_id, event_id, entity, entity_id, from_state, to_state)
  VALUES ('pgb-o' || :o, 'pgb-' || :n, 'refund', 're-' || :n, NULL, 'pending');
UPDATE webhook_events SET outcome = 'applied', order_id = 'pgb-o' || :o, processed_at = now()
  WHERE id = 'pgb-' || :n;
COMMIT;

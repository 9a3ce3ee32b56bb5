-- One event's database work in refundsync: record the copy (its own transaction), then lock
-- the event and the order, read the order's rows, write a refund, a history row, the order
-- and the outcome (one transaction).
\set n random(1, 2000000000)
\set o random(1, 2000)
BEGIN;
INSERT INTO webhook_events (id, type, payload, outcome, deliveries, attempts, received_at)
  VALUES ('pgb-' || :n, 'refund.pending', '{"id": "x"}', 'queued', 1, 1, now())
  ON CONFLICT (id) DO UPDATE SET deliveries = webhook_events.deliveries + 1
  RETURNING outcome, attempts, lost_attempts, type, error;
COMMIT;
BEGIN;
SELECT outcome FROM webhook_events WHERE id = 'pgb-' || :n FOR UPDATE;
INSERT INTO orders (id) VALUES ('pgb-o' || :o) ON CONFLICT DO NOTHING;
SELECT * FROM orders WHERE id = 'pgb-o' || :o FOR UPDATE;
SELECT * FROM refunds WHERE order_id = 'pgb-o' || :o;
SELECT * FROM charge_refunds WHERE order_id = 'pgb-o' || :o;
SELECT * FROM chargebacks WHERE order_id = 'pgb-o' || :o;
UPDATE orders SET currency = 'USD', updated_at = now() WHERE id = 'pgb-o' || :o;
INSERT INTO refunds (order_id, id, state, amount, refunded_amount, last_event_id, last_event_time)
  VALUES ('pgb-o' || :o, 're-' || :n, 'pending', 10.00, 0, 'pgb-' || :n, now())
  ON CONFLICT (order_id, id) DO UPDATE SET state = excluded.state;
INSERT INTO refund_history (order_id, event_id, entity, entity_id, from_state, to_state)
  VALUES ('pgb-o' || :o, 'pgb-' || :n, 'refund', 're-' || :n, NULL, 'pending');
UPDATE webhook_events SET outcome = 'applied', order_id = 'pgb-o' || :o, processed_at = now()
  WHERE id = 'pgb-' || :n;
COMMIT;

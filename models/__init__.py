"""Settings, DR payload schemas, tables, error types and the pure refund rules."""

"""The HTTP edge: verify DR's signature, queue the raw event, answer 202."""
